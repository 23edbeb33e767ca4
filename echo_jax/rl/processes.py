"""The on-policy loop as N processes (echo_jax.train.distributed), each the same program.

Rollouts: every `run` of requests (an iteration's groups, the pool's probes, the greedy
evaluations) is split by `process_share`, each process running its contiguous block of the
requests in its own engine, on its own copy of the replicated parameters (`local_replica`),
so that sampling is no collective. An episode depends on its request alone (its own sampling
seed, `rl.pool.rollout_seed`, and its own cache row), so the union of the blocks is what one
process would have run. The blocks are then exchanged with `distributed.all_gather_json`
(compressed JSON through JAX's public `multihost_utils.process_allgather`; chosen over files
in the workdir and a barrier, which need cleaning up and a filesystem that shows one
process's fresh files to the others at once, and over the coordination service's key-value
store, which JAX does not expose as public API): every process ends with every record, in
request order, and so computes the same pool, advantages, rows and metrics.

The update and the scoring: collectives over all processes' devices (`rl.update`). Files:
process 0 alone writes them (RunDir, the rollouts); the checkpoint saves are collective.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from echo_jax.agent.rollout import EpisodeRequest, RolloutEngine, Timing
from echo_jax.train import distributed


class SharedEngine:
    """A RolloutEngine whose `run` is split over the processes and returns every request's
    episode on every process; with one process, the engine's own `run`."""

    def __init__(self, engine: RolloutEngine):
        self.engine = engine

    @property
    def timing(self) -> Timing:
        """This process's part of the last `run`."""
        return self.engine.timing

    def set_params(self, params: Any) -> None:
        self.engine.set_params(distributed.local_replica(params))

    def run(self, requests: Sequence[EpisodeRequest]) -> list[dict[str, Any]]:
        if jax.process_count() == 1:
            return self.engine.run(requests)
        mine = self.engine.run(requests[distributed.process_share(len(requests))])
        return distributed.all_gather_json(mine)
