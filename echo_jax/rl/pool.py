"""The task pool every iteration revisits, chosen once by probing candidate tasks from the
start checkpoint, and the sampling requests and greedy evaluations on it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from echo_jax.agent.closed_loop import SUCCESS, choose_tasks, mute_fork_warning, split_tasks
from echo_jax.agent.policy import load_run
from echo_jax.agent.rollout import EngineConfig, EpisodeRequest, RolloutEngine
from echo_jax.awm.world_format import load_worlds
from echo_jax.config import RLConfig, validate_rl
from echo_jax.rl.processes import SharedEngine
from echo_jax.util.atomic import atomic_write_text


def rollout_seed(seed: int, iteration: int, scenario: str, task_idx: int, g: int) -> int:
    rng = np.random.default_rng([seed, iteration, task_idx, g, *(ord(c) for c in scenario)])
    return int(rng.integers(2**31))


def group_requests(tasks, iteration: int, seed: int, g: int, temperature: float):
    """g rollouts of each task, each with its own sampling seed (greedy at temperature 0)."""
    return [
        EpisodeRequest(scenario, task_idx, rollout_seed(seed, iteration, scenario, task_idx, k),
                       temperature, 1.0, {"iteration": iteration, "sample": k, "seed": seed,
                                          "temperature": temperature, "top_p": 1.0})
        for scenario, task_idx in tasks
        for k in range(g)
    ]  # fmt: skip


def success_rate(records: Sequence[dict[str, Any]]) -> float:
    return float(np.mean([r["step_reward_types"][-1] == SUCCESS for r in records]))


def choose_pool(engine: RolloutEngine | SharedEngine, candidates, rl: RLConfig) -> dict[str, Any]:
    """Probes each candidate task with rl.pool_probe sampled rollouts and keeps those whose
    success rate lies in [pool_min_success, pool_max_success], closest to 0.5 first."""
    records = engine.run(group_requests(candidates, 0, rl.pool_seed, rl.pool_probe, 1.0))
    rates = [success_rate(records[i * rl.pool_probe : (i + 1) * rl.pool_probe])
             for i in range(len(candidates))]  # fmt: skip
    band = [(abs(p - 0.5), c, p) for c, p in zip(candidates, rates, strict=True)
            if rl.pool_min_success <= p <= rl.pool_max_success]  # fmt: skip
    chosen = sorted(band)[: rl.pool_size]
    return {
        "tasks": sorted([list(c) for _, c, _ in chosen]),
        "probe_success": {f"{s}/{t}": p for (s, t), p in zip(candidates, rates, strict=True)},
        "probe_env_steps": sum(len(r["steps"]) for r in records),
        "settings": {k: getattr(rl, k) for k in ("pool_size", "pool_candidates", "pool_probe",
                     "pool_min_success", "pool_max_success", "pool_seed", "split")},
    }  # fmt: skip


def greedy_pass(engine: RolloutEngine | SharedEngine, tasks, seed: int) -> float:
    return success_rate(engine.run(group_requests(tasks, 0, seed, 1, 0.0)))


def load_pool(path: str) -> list[tuple[str, int]]:
    with open(path) as f:
        return [(s, int(t)) for s, t in json.load(f)["tasks"]]


def make_pool(
    out_path: str,
    start: str,
    rl: RLConfig,
    worlds: str,
    corpus_dir: str | None,
    scenarios: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Chooses the pool from the `start` run's checkpoint (`choose_pool`) and writes it to
    out_path, so that every arm and seed of a sweep trains on the same tasks."""
    validate_rl(rl)
    mute_fork_warning()
    cfg, vocab, graphdef, params, _ = load_run(start)
    loaded = load_worlds(worlds, scenarios)
    candidates = choose_tasks(split_tasks(loaded, corpus_dir, rl.split), rl.pool_candidates,
                              rl.pool_seed)  # fmt: skip
    with RolloutEngine(graphdef, params, vocab, cfg.data.max_len, loaded, EngineConfig.of(rl),
                       cfg.data.canonical_json) as engine:  # fmt: skip
        pool = choose_pool(engine, candidates, rl)
    atomic_write_text(out_path, json.dumps(pool, indent=2, sort_keys=True))
    return pool
