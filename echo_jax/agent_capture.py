"""The trained agent as a capture policy: `experiments.capture --policy=agent --checkpoint=DIR`.

For world folders without scripted-policy parameters (a downloaded AgentWorldModel-1K copy),
the capture's behaviour policy is a training run's model acting through the closed-loop API
(`closed_loop.run_agent_episode`, `agent.ModelAgent`) with the tools the server lists over MCP.
Each episode's sampling key derives from the capture seed exactly as the scripted policies'
generators do (`capture.episode_rng`), so a capture is reproducible for a given checkpoint.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import jax

from echo_jax.awm.capture import WORLD_FAILURES, CaptureConfig, LiveWorld, episode_rng
from echo_jax.closed_loop import mute_fork_warning, run_agent_episode
from echo_jax.config import AgentConfig

log = logging.getLogger(__name__)


@functools.cache
def _load(checkpoint: str, max_new_tokens: int):
    """(config, decoder, checkpoint step), loaded once per capture worker process."""
    from echo_jax.agent import load_run
    from echo_jax.decoding import Decoder

    cfg, vocab, graphdef, params, step = load_run(checkpoint)
    return cfg, Decoder(graphdef, params, vocab, cfg.data.max_len, max_new_tokens), step


def capture_agent_episode(
    live: LiveWorld, config: CaptureConfig, task_idx: int, k: int
) -> tuple[dict[str, Any] | None, str | None]:
    """One agent episode, the world restarted after a failure; (episode, last error) as capture."""
    agent = config.agent or AgentConfig()
    cfg, decoder, step = _load(os.path.abspath(config.checkpoint), agent.max_new_tokens)
    rng = episode_rng(config.seed, live.world.name, task_idx, k)
    key = jax.random.key(int(rng.integers(2**31)))

    def generate(prompts, sub_key):
        return decoder.generate(prompts, sub_key, agent.temperature, agent.top_p)

    mute_fork_warning()
    try:
        episode = run_agent_episode(
            live,
            task_idx,
            generate,
            decoder,
            key,
            config.harness,
            cfg.data.canonical_json,
            attempts=config.episode_attempts,
        )
    except WORLD_FAILURES as error:
        log.warning("%s task %d k %d: %s; giving up", live.world.name, task_idx, k, error)
        live.restart()
        return None, f"{type(error).__name__}: {error}"
    episode["capture"] = {
        "seed": config.seed,
        "k": k,
        "policy": "agent",
        "checkpoint": os.path.abspath(config.checkpoint),
        "step": step,
        "temperature": agent.temperature,
        "top_p": agent.top_p,
    }
    return episode, None
