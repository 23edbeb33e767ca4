"""Continuing an interrupted on-policy run from its last finished iteration.

An iteration's metrics line is written before its checkpoint, so the latest checkpoint's
iteration always has its line; lines after it (an iteration cut between the two) are dropped.
Everything else an iteration draws is a function of (seed, iteration): the rollout requests'
sampling keys (`pool.group_requests`) and the update's minibatch order (`update_rng`), so a
resumed run samples and updates as the uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from echo_jax.config import RLConfig
from echo_jax.train.run_dir import RunDir, RunDirError, config_changes, flatten

ITERATION = "iteration"


def update_rng(rl: RLConfig, iteration: int) -> np.random.Generator:
    """The update's minibatch order in `iteration`, the same whenever the iteration runs."""
    return np.random.default_rng([rl.seed, 1, iteration])


def rl_settings(rl: RLConfig, start: str | None) -> dict[str, Any]:
    return {"rl": dataclasses.asdict(rl), "start": start}


def check_same_settings(path: str, rl: RLConfig, start: str | None) -> None:
    """Refuses to continue a run under other RL settings (or another start)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = flatten(json.load(f))
    wanted = flatten(json.loads(json.dumps(rl_settings(rl, start))))
    changes = config_changes(saved, wanted)
    if changes:
        where = os.path.dirname(path)
        raise RunDirError(f"{where} holds an RL run with other settings ({changes})")


@dataclasses.dataclass
class ResumePoint:
    state: Any  # The train state after `iteration`.
    iteration: int
    env_steps: int
    wall_s: float  # Wall time of the loop before the interruption.
    lines: list[dict[str, Any]]  # Metrics lines 0..iteration.


def resume_point(run: RunDir, template: Any) -> ResumePoint | None:
    """The run's last finished iteration (its state restored like `template`), with the
    metrics file cut back to it; None where no iteration was saved."""
    last = run.latest_checkpoint_step()
    if last is None:
        run.truncate_metrics(after_step=-1, key=ITERATION)
        return None
    state, meta = run.restore(template, last)
    run.truncate_metrics(after_step=last, key=ITERATION)
    lines = run.read_metrics()
    if [m[ITERATION] for m in lines] != list(range(last + 1)):
        raise RunDirError(f"{run.path}: metrics lines {[m[ITERATION] for m in lines]} do not "
                          f"run 0..{last}, the last checkpoint's iteration")  # fmt: skip
    return ResumePoint(state, last, int(meta["env_steps"]), float(meta.get("wall_s", 0.0)), lines)
