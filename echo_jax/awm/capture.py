"""Capture behaviour-policy episodes from AWM worlds into one gzipped JSONL shard per scenario.

Every episode's randomness comes from numpy SeedSequence(seed, spawn_key=(scenario hash,
task_idx, k)), and shards hold episodes in (task_idx, k) order, so the bytes written depend only
on the seed and the worlds, not on the number of workers or on interruptions. Shards are written
to a temp file and renamed into place, so a shard either is complete or does not exist; a rerun
skips shards whose episodes match the requested K and seed and redoes the rest.

A world server that dies, hangs or answers 5xx costs at most the episode in flight: it is
discarded, the server restarted, and the episode rerun from its own seed (a bounded number of
times). An episode that still fails is left out of its shard and reported in the manifest; the
incomplete shard is then redone by the next run.

The behaviour policy is either the scripted one (`policy_module`, which needs its parameters
in the world folder, e.g. our `echo_task_params.jsonl`) or, for any AWM folder such as a
downloaded AgentWorldModel-1K copy, a training run's agent (`policy="agent"`,
`echo_jax.agent.capture`). A scripted capture of a folder without parameters is refused up front.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import importlib
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from echo_jax.awm.capture_shards import read_shard, shard_is_complete, shard_path, write_shard
from echo_jax.awm.child_process import parent_death_hook
from echo_jax.awm.harness import HarnessConfig, run_episode
from echo_jax.awm.live_world import WORLD_FAILURES, LiveWorld
from echo_jax.awm.world_format import World, load_worlds
from echo_jax.config import AgentConfig
from echo_jax.util.atomic import atomic_write_text
from echo_jax.util.provenance import git_commit

log = logging.getLogger(__name__)

SCRIPTED, AGENT = "scripted", "agent"
POLICIES = (SCRIPTED, AGENT)


class CaptureError(ValueError):
    """A capture that cannot run as configured (e.g. no policy parameters); nothing is written."""


@dataclass(frozen=True)
class CaptureConfig:
    worlds_dir: str
    out_dir: str
    episodes_per_task: int
    seed: int
    scenarios: tuple[str, ...] | None = None
    workers: int = 2
    episode_attempts: int = 3
    request_timeout_s: float = 30.0  # A world that answers no MCP request within this is hung.
    policy_module: str = "echo_jax.awm.policies"
    harness: HarnessConfig = field(default_factory=HarnessConfig)
    policy: str = SCRIPTED  # SCRIPTED (policy_module) or AGENT (the checkpoint's model).
    checkpoint: str | None = None  # Training run whose agent acts when policy == AGENT.
    agent: AgentConfig | None = None  # Its sampling settings (default AgentConfig()).
    command: str = ""


def episode_rng(seed: int, scenario: str, task_idx: int, k: int) -> np.random.Generator:
    """The episode's own generator; a stable hash keeps it independent of Python's hash salt."""
    scenario_key = int.from_bytes(hashlib.sha256(scenario.encode()).digest()[:8], "little")
    sequence = np.random.SeedSequence(entropy=seed, spawn_key=(scenario_key, task_idx, k))
    return np.random.default_rng(sequence)


@functools.cache
def _policy_source(module_name: str, worlds_dir: str) -> tuple[Any, Any]:
    """The policy module and its task parameters, loaded once per worker process."""
    module = importlib.import_module(module_name)
    return module, module.load_task_params(worlds_dir)


def _capture_episode(
    live: LiveWorld, config: CaptureConfig, task_idx: int, k: int
) -> tuple[dict[str, Any] | None, str | None]:
    """Run one episode, restarting the world after a failure; return (episode, last error)."""
    policies, params = _policy_source(config.policy_module, config.worlds_dir)
    last_error = None
    for _ in range(config.episode_attempts):
        rng = episode_rng(config.seed, live.world.name, task_idx, k)
        mode = policies.choose_mode(rng)
        policy = policies.make_policy(live.world.name, task_idx, params, mode, rng)
        try:
            episode = run_episode(
                live.server, live.client, live.world, task_idx, policy, config.harness
            )
        except WORLD_FAILURES as error:
            last_error = f"{type(error).__name__}: {error}"
            log.warning("%s task %d k %d: %s; restarting", live.world.name, task_idx, k, error)
            live.restart()
            continue
        episode["capture"] = {"seed": config.seed, "k": k, "policy_mode": str(mode)}
        return episode, None
    return None, last_error


# A trained agent's episodes of one world: (episodes, failures). The agent layer supplies it
# (echo_jax.agent.capture.capture_agent_scenario); the world layer never imports the model.
AgentEpisodes = Callable[
    ["CaptureConfig", World], tuple[list[dict[str, Any]], list[dict[str, Any]]]
]


def capture_scenario(
    config: CaptureConfig, scenario: str, agent_episodes: AgentEpisodes | None = None
) -> dict[str, Any]:
    """Capture and write one scenario's shard; returns a summary for the progress log."""
    started = time.monotonic()
    world = load_worlds(config.worlds_dir, [scenario])[scenario]
    if config.policy == AGENT:
        episodes, failures = agent_episodes(config, world)
        write_shard(shard_path(config.out_dir, scenario), episodes)
        return {"scenario": scenario, "episodes": len(episodes), "failed_episodes": failures,
                "seconds": time.monotonic() - started}  # fmt: skip
    live = LiveWorld(world, config.request_timeout_s)
    episodes, failures = [], []
    try:
        live.open()
        for task_idx in range(len(world.tasks)):
            for k in range(config.episodes_per_task):
                episode, error = _capture_episode(live, config, task_idx, k)
                if episode is None:
                    failures.append({"task_idx": task_idx, "k": k, "error": error})
                else:
                    episodes.append(episode)
    finally:
        live.close()
    write_shard(shard_path(config.out_dir, scenario), episodes)
    return {
        "scenario": scenario,
        "episodes": len(episodes),
        "failed_episodes": failures,
        "seconds": time.monotonic() - started,
    }


def _run_shards(
    config: CaptureConfig, scenarios: list[str], agent_episodes: AgentEpisodes | None
) -> Iterator[tuple[str, Any]]:
    """Yield (scenario, summary or exception) as shards finish, in-process or in workers."""
    if config.workers <= 1 or len(scenarios) <= 1:
        for scenario in scenarios:
            try:
                yield scenario, capture_scenario(config, scenario, agent_episodes)
            except Exception as error:  # noqa: BLE001 -- one broken world must not stop the rest
                yield scenario, error
        return
    # spawn, not fork: forked children would inherit the parent's threads and sockets.
    context = multiprocessing.get_context("spawn")
    workers = min(config.workers, len(scenarios))
    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=context,
        initializer=_die_with_parent,
        initargs=(os.getpid(),),
    ) as pool:
        futures = {pool.submit(capture_scenario, config, s, agent_episodes): s for s in scenarios}
        for future in as_completed(futures):
            error = future.exception()
            yield futures[future], (error if error is not None else future.result())


def _die_with_parent(parent_pid: int) -> None:
    """Worker initializer: a killed capture takes its workers (and so their servers) with it."""
    parent_death_hook()()
    if os.getppid() != parent_pid:  # The parent died before the signal was armed.
        os._exit(1)


def build_manifest(
    config: CaptureConfig,
    worlds: dict[str, World],
    run_summary: dict[str, Any],
) -> dict[str, Any]:
    """Summarise the shards on disk (this run's and resumed ones) as one plain, JSON-able dict.

    Extension point: later statistics (token counts per role, train/eval splits) are further
    top-level keys added to this dict before `write_manifest`; keep it a flat dict of JSON values.
    """
    counts: dict[str, dict[str, int]] = {}
    final_types: collections.Counter[str] = collections.Counter()
    step_types: collections.Counter[str] = collections.Counter()
    n_episodes = n_with_tool_error = 0
    reward_sum = 0.0
    for scenario in worlds:
        path = shard_path(config.out_dir, scenario)
        if not path.exists():
            continue
        per_task = counts.setdefault(scenario, {})
        for episode in read_shard(path):
            n_episodes += 1
            key = str(episode["task_idx"])
            per_task[key] = per_task.get(key, 0) + 1
            final_types[episode["step_reward_types"][-1]] += 1
            step_types.update(episode["step_reward_types"])
            reward_sum += episode["reward"]
            tool_steps = episode["steps"][:-1]
            n_with_tool_error += any("error" in step["observation"] for step in tool_steps)
    captured = run_summary["episodes_captured"]
    wall = run_summary["wall_time_s"]
    return {
        "command": config.command,
        "worlds_dir": str(config.worlds_dir),
        "seed": config.seed,
        "episodes_per_task": config.episodes_per_task,
        "policy": config.policy,
        "policy_module": config.policy_module if config.policy == SCRIPTED else None,
        "checkpoint": config.checkpoint if config.policy == AGENT else None,
        "git_commit": git_commit(mark_dirty=False) or "unknown",
        "n_scenarios": len(counts),
        "n_episodes": n_episodes,
        "counts": counts,
        "success_rate": final_types["complete"] / n_episodes if n_episodes else 0.0,
        "mean_reward": reward_sum / n_episodes if n_episodes else 0.0,
        "final_reward_types": dict(sorted(final_types.items())),
        "step_reward_types": dict(sorted(step_types.items())),
        "tool_error_episode_share": n_with_tool_error / n_episodes if n_episodes else 0.0,
        "resumed_shards": run_summary["resumed_shards"],
        "failed_scenarios": run_summary["failed_scenarios"],
        "failed_episodes": run_summary["failed_episodes"],
        "episodes_captured_this_run": captured,
        "wall_time_s": round(wall, 3),
        "episodes_per_s": round(captured / wall, 3) if wall > 0 else 0.0,
    }


def write_manifest(out_dir: str | Path, manifest: dict[str, Any]) -> Path:
    path = Path(out_dir) / "manifest.json"
    atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")
    return path


def check_policy(
    config: CaptureConfig, worlds: dict[str, World], agent_episodes: AgentEpisodes | None = None
) -> None:
    """Raise CaptureError, before any server starts, when the policy cannot act in these worlds."""
    if config.policy not in POLICIES:
        raise CaptureError(f"policy={config.policy!r} is not one of {POLICIES}")
    if config.policy == AGENT:
        if agent_episodes is None:
            raise CaptureError(
                "policy=agent needs the agent's episodes: pass "
                "echo_jax.agent.capture.capture_agent_scenario to run_capture"
            )
        if not config.checkpoint or not (Path(config.checkpoint) / "config.json").is_file():
            raise CaptureError(
                f"policy=agent needs --checkpoint=DIR, a training run folder with config.json "
                f"(got {config.checkpoint!r})"
            )
        return
    try:
        _, params = _policy_source(config.policy_module, config.worlds_dir)
    except FileNotFoundError as error:
        raise CaptureError(
            f"{config.worlds_dir} has no parameters for the scripted policies of "
            f"{config.policy_module} ({error.filename} is missing); to capture in this folder, "
            f"let a trained agent act: --policy=agent --checkpoint=RUN_DIR"
        ) from None
    if isinstance(params, dict) and params and all(isinstance(key, tuple) for key in params):
        missing = [
            (name, t)
            for name, world in worlds.items()
            for t in range(len(world.tasks))
            if (name, t) not in params
        ]
        if missing:
            raise CaptureError(
                f"{config.worlds_dir}: the scripted policies of {config.policy_module} have no "
                f"parameters for {len(missing)} task(s), e.g. scenario {missing[0][0]!r} task_idx "
                f"{missing[0][1]}; use --policy=agent --checkpoint=RUN_DIR or pick --scenarios"
            )


def run_capture(
    config: CaptureConfig, agent_episodes: AgentEpisodes | None = None
) -> dict[str, Any]:
    """Capture every requested scenario not already complete on disk; write the manifest.
    `agent_episodes` acts for policy=agent."""
    started = time.monotonic()
    worlds = load_worlds(config.worlds_dir, config.scenarios)
    check_policy(config, worlds, agent_episodes)
    resumed = [
        name
        for name, world in worlds.items()
        if shard_is_complete(
            shard_path(config.out_dir, name), world, config.episodes_per_task, config.seed
        )
    ]
    todo = [name for name in worlds if name not in resumed]
    log.info(
        "%d scenarios: %d already complete, %d to capture", len(worlds), len(resumed), len(todo)
    )

    failed_scenarios: dict[str, str] = {}
    failed_episodes: dict[str, list[dict[str, Any]]] = {}
    captured = 0
    for done, (scenario, outcome) in enumerate(_run_shards(config, todo, agent_episodes), start=1):
        elapsed = time.monotonic() - started
        eta = elapsed / done * (len(todo) - done)
        if isinstance(outcome, BaseException):
            failed_scenarios[scenario] = f"{type(outcome).__name__}: {outcome}"
            log.error("%s failed: %s", scenario, failed_scenarios[scenario])
            continue
        captured += outcome["episodes"]
        if outcome["failed_episodes"]:
            failed_episodes[scenario] = outcome["failed_episodes"]
        log.info(
            "%s: %d episodes in %.1fs (%.2f episodes/s) | %d/%d scenarios | ETA %.0fs",
            scenario,
            outcome["episodes"],
            outcome["seconds"],
            outcome["episodes"] / max(outcome["seconds"], 1e-9),
            done,
            len(todo),
            eta,
        )
    run_summary = {
        "episodes_captured": captured,
        "wall_time_s": time.monotonic() - started,
        "resumed_shards": sorted(resumed),
        "failed_scenarios": failed_scenarios,
        "failed_episodes": failed_episodes,
    }
    manifest = build_manifest(config, worlds, run_summary)
    write_manifest(config.out_dir, manifest)
    return manifest
