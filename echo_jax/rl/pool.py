"""The task pool every iteration revisits, chosen once from the start checkpoint: by probing
candidate tasks (a success-rate band), or by difficulty band from a table of every task
(`echo_jax.rl.difficulty`); and the sampling requests and greedy evaluations on it."""

from __future__ import annotations

import collections
import contextlib
import json
import os
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


def read_pool(path: str) -> dict[str, Any]:
    """A pool.json: its tasks as (scenario, task_idx), and its bands if it was drawn by band."""
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    return {"tasks": [(s, int(t)) for s, t in saved["tasks"]], "bands": saved.get("bands", {})}


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
    if rl.pool_difficulty:
        pool = pool_by_band(rl, start)
    else:
        with start_engine(start, rl, worlds, scenarios) as (engine, loaded):
            candidates = choose_tasks(split_tasks(loaded, corpus_dir, rl.split),
                                      rl.pool_candidates, rl.pool_seed)  # fmt: skip
            pool = choose_pool(engine, candidates, rl)
    atomic_write_text(out_path, json.dumps(pool, indent=2, sort_keys=True))
    return pool


def pool_by_band(rl: RLConfig, start: str) -> dict[str, Any]:
    """The pool drawn by band from `start`'s table in rl.pool_difficulty (rl.difficulty)."""
    with open(rl.pool_difficulty, encoding="utf-8") as f:
        tables = json.load(f)["starts"]
    key = start_key(start)
    if key not in tables:
        raise ValueError(
            f"{rl.pool_difficulty} has no table for start {key!r} (it has {sorted(tables)}); "
            "make one with experiments.rl --probe_only"
        )
    counts = {"zero": rl.pool_zero, "low": rl.pool_low}
    pool = band_pool(tables[key], counts, rl.pool_seed)
    return pool | {"from": rl.pool_difficulty, "start": key, "settings": {"counts": counts,
                   "pool_seed": rl.pool_seed}}  # fmt: skip


def start_key(start: str) -> str:
    """How a start is named in task_difficulty.json (a normalised relative path)."""
    return os.path.normpath(start)


def band_pool(table: dict[str, Any], counts: dict[str, int], seed: int) -> dict[str, Any]:
    """`counts[band]` tasks of each band, spread over templates and domains: each pick takes a
    task of the band whose template, then domain, the pool holds least (ties by a seeded
    shuffle), so a few templates never fill the pool."""
    rng = np.random.default_rng(seed)
    chosen: list[dict] = []
    for band, n in counts.items():
        candidates = [r for r in table["tasks"] if r["band"] == band]
        if len(candidates) < n:
            raise ValueError(f"the pool wants {n} '{band}' tasks; the table has "
                             f"{len(candidates)}: {table['band_counts']}")  # fmt: skip
        rank = {id(candidates[j]): i for i, j in enumerate(rng.permutation(len(candidates)))}
        for _ in range(n):
            templates = collections.Counter(r["template"] for r in chosen)
            domains = collections.Counter(r["domain"] for r in chosen)
            taken = {id(r) for r in chosen}
            pick = min(
                (r for r in candidates if id(r) not in taken),
                key=lambda r: (templates[r["template"]], domains[r["domain"]], rank[id(r)]),
            )
            chosen.append(pick)
    tasks = sorted([r["scenario"], r["task_idx"]] for r in chosen)
    return {
        "tasks": tasks,
        "bands": {f"{r['scenario']}/{r['task_idx']}": r["band"] for r in chosen},
        "templates": sorted({r["template"] for r in chosen}),
        "domains": sorted({r["domain"] for r in chosen}),
        "start_pass": {f"{r['scenario']}/{r['task_idx']}": r["sampled_pass"] for r in chosen},
    }


@contextlib.contextmanager
def start_engine(start: str, rl: RLConfig, worlds: str, scenarios: Sequence[str] | None = None):
    """A rollout engine with the `start` run's model and rl's settings, and the loaded worlds."""
    mute_fork_warning()
    cfg, vocab, graphdef, params, _ = load_run(start)
    loaded = load_worlds(worlds, scenarios)
    with RolloutEngine(graphdef, params, vocab, cfg.data.max_len, loaded, EngineConfig.of(rl),
                       cfg.data.canonical_json) as engine:  # fmt: skip
        yield engine, loaded
