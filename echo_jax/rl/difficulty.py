"""Every training task's difficulty at a start checkpoint, and a task pool drawn by difficulty.

ECHO's case is sparse reward: a task the start never solves gives GRPO all-fail groups, which
carry no policy gradient, while the env term still trains. So the pool of that experiment is
drawn from bands of the start's sampled pass rate, measured here for every task of a split:

    zero      never solved in the samples, but a scripted policy of the corpus solves it
    low       solved in at most LOW_MAX of the samples
    mid       at most MID_MAX (the band of the earlier, saturated experiment)
    high      more often
    unsolved  never solved, and no scripted episode of the corpus solved it either

`results/task_difficulty.json` holds one such table per start (`experiments.task_difficulty`).
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from echo_jax.agent.closed_loop import SUCCESS, split_tasks
from echo_jax.awm.capture_shards import read_shard
from echo_jax.awm.policies import load_task_params
from echo_jax.config import RLConfig, validate_rl
from echo_jax.data import corpus
from echo_jax.rl.pool import group_requests, start_engine, start_key
from echo_jax.util.atomic import atomic_write_text

LOW_MAX = 0.2
MID_MAX = 0.7
BANDS = ("zero", "low", "mid", "high", "unsolved")
POOL_BANDS = ("zero", "low")  # The bands a sparse-regime pool is drawn from.


def band_of(successes: int, samples: int, scripted_successes: int) -> str:
    if successes == 0:
        return "zero" if scripted_successes > 0 else "unsolved"
    rate = successes / samples
    return "low" if rate <= LOW_MAX else "mid" if rate <= MID_MAX else "high"


def scripted_outcomes(corpus_dir: str) -> dict[tuple[str, int], list[float]]:
    """(scenario, task_idx) -> the rewards of the corpus's scripted episodes of that task."""
    out: dict[tuple[str, int], list[float]] = collections.defaultdict(list)
    for path in corpus.shard_files(corpus_dir):
        for record in read_shard(path):
            out[(record["scenario"], int(record["task_idx"]))].append(float(record["reward"]))
    return out


def probe(engine, tasks: Sequence[tuple[str, int]], samples: int, seed: int) -> dict:
    """`samples` sampled rollouts (temperature 1) and one greedy rollout of every task."""
    sampled = engine.run(group_requests(tasks, 0, seed, samples, 1.0))
    greedy = engine.run(group_requests(tasks, 0, seed, 1, 0.0))
    out = {}
    for i, task in enumerate(tasks):
        group = sampled[i * samples : (i + 1) * samples]
        out[task] = {
            "successes": sum(r["step_reward_types"][-1] == SUCCESS for r in group),
            "greedy_success": greedy[i]["step_reward_types"][-1] == SUCCESS,
            "mean_steps": float(np.mean([len(r["steps"]) for r in group])),
        }
    out["env_steps"] = sum(len(r["steps"]) for r in (*sampled, *greedy))
    return out


def difficulty_table(
    engine,
    tasks: Sequence[tuple[str, int]],
    worlds_dir: str,
    corpus_dir: str,
    samples: int,
    seed: int,
) -> dict[str, Any]:
    """The table of one start: per task its template, domain, scripted success and sampled
    pass rate, and its band."""
    params = load_task_params(worlds_dir)
    scripted = scripted_outcomes(corpus_dir)
    probed = probe(engine, tasks, samples, seed)
    rows = []
    for scenario, task_idx in tasks:
        rewards = scripted.get((scenario, task_idx), [])
        script_wins = int(sum(r >= 1.0 for r in rewards))
        p = probed[(scenario, task_idx)]
        rows.append(
            {
                "scenario": scenario,
                "task_idx": task_idx,
                "template": params[(scenario, task_idx)]["template"],
                "domain": corpus.domain_of(scenario),
                "scripted_success": script_wins / len(rewards) if rewards else 0.0,
                "scripted_episodes": len(rewards),
                "sampled_successes": int(p["successes"]),
                "samples": samples,
                "sampled_pass": p["successes"] / samples,
                "greedy_success": bool(p["greedy_success"]),
                "mean_steps": p["mean_steps"],
                "band": band_of(int(p["successes"]), samples, script_wins),
            }
        )
    counts = collections.Counter(r["band"] for r in rows)
    return {
        "tasks": rows,
        "band_counts": {b: counts.get(b, 0) for b in BANDS},
        "samples": samples,
        "seed": seed,
        "probe_env_steps": probed["env_steps"],
    }


def write_task_difficulty(
    out_path: str, start: str, rl: RLConfig, worlds: str, corpus_dir: str
) -> dict[str, Any]:
    """Probes every task of rl.split from `start` (rl.pool_probe samples each, rl.pool_seed)
    and writes its table into out_path under the start's name, keeping the other starts'."""
    validate_rl(rl)
    with start_engine(start, rl, worlds) as (engine, loaded):
        tasks = split_tasks(loaded, corpus_dir, rl.split)
        table = difficulty_table(engine, tasks, worlds, corpus_dir, rl.pool_probe, rl.pool_seed)
    table["settings"] = {k: getattr(rl, k) for k in ("split", "max_steps", "max_new_tokens")}
    tables = {}
    if os.path.exists(out_path):
        with open(out_path, encoding="utf-8") as f:
            tables = json.load(f)["starts"]
    tables[start_key(start)] = table
    atomic_write_text(out_path, json.dumps({"starts": tables}, indent=1, sort_keys=True) + "\n")
    return table
