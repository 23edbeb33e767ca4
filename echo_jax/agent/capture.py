"""The trained agent as a capture policy: `experiments.capture --policy=agent --checkpoint=DIR`.

For world folders without scripted-policy parameters (a downloaded AgentWorldModel-1K copy),
the capture's behaviour policy is a training run's model acting through the rollout engine
(`echo_jax.agent.rollout`) with the tools the server lists over MCP. Each episode's sampling key
derives from the capture seed exactly as the scripted policies' generators do
(`capture.episode_rng`), so a capture is reproducible for a given checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

from echo_jax.awm.capture import CaptureConfig, episode_rng
from echo_jax.awm.world_format import World
from echo_jax.config import AgentConfig


def capture_agent_scenario(
    config: CaptureConfig, world: World
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(episodes in (task_idx, k) order, failures) of one scenario's agent capture."""
    from echo_jax.agent.closed_loop import mute_fork_warning
    from echo_jax.agent.policy import load_run  # JAX only where it is used.
    from echo_jax.agent.rollout import EngineConfig, EpisodeRequest, RolloutEngine

    mute_fork_warning()
    agent = config.agent or AgentConfig()
    checkpoint = os.path.abspath(config.checkpoint)
    cfg, vocab, graphdef, params, step = load_run(checkpoint)
    grid = [(t, k) for t in range(len(world.tasks)) for k in range(config.episodes_per_task)]
    requests = [
        EpisodeRequest(
            world.name,
            t,
            int(episode_rng(config.seed, world.name, t, k).integers(2**31)),
            agent.temperature,
            agent.top_p,
            tag={
                "seed": config.seed,
                "k": k,
                "policy": "agent",
                "checkpoint": checkpoint,
                "step": step,
                "temperature": agent.temperature,
                "top_p": agent.top_p,
            },
        )  # fmt: skip
        for t, k in grid
    ]
    engine_cfg = EngineConfig.of(
        agent, max_steps=config.harness.max_tool_calls, attempts=config.episode_attempts
    )
    with RolloutEngine(graphdef, params, vocab, cfg.data.max_len, {world.name: world},
                       engine_cfg, cfg.data.canonical_json) as engine:  # fmt: skip
        results = engine.run(requests, skip_failed=True)
    episodes, failures = [], []
    for (t, k), episode in zip(grid, results, strict=True):
        if isinstance(episode, BaseException):
            failures.append(
                {"task_idx": t, "k": k, "error": f"{type(episode).__name__}: {episode}"}
            )
            continue
        episode["capture"] = episode.pop("agent")
        episodes.append(episode)
    return episodes, failures
