"""A tiny corpus folder (shards + manifest with splits) built inside a test, like a capture's."""

from __future__ import annotations

import json
import os

from echo_jax.data import corpus
from tests.test_data import small_episode, write_jsonl


def make_tiny_corpus(folder, scenarios=("shop_1", "shop_2", "shop_3"), tasks=3, per_task=2):
    """Scenarios x tasks x per_task episodes; rewards alternate 1/0 within each task's group."""
    folder = str(folder)
    os.makedirs(os.path.join(folder, corpus.EPISODES_DIR), exist_ok=True)
    for s, name in enumerate(scenarios):
        records = [
            small_episode(
                scenario=name,
                task_idx=t,
                task=f"Buy {t + 1} apples in {name}.",
                reward=float((e + s) % 2),
            )
            for t in range(tasks)
            for e in range(per_task)
        ]
        write_jsonl(os.path.join(folder, corpus.EPISODES_DIR, f"{name}.jsonl.gz"), records, gz=True)
    splits = corpus.assign_splits(
        dict.fromkeys(scenarios, tasks), seed=0, scenarios_per_domain=1, tasks_per_scenario_held=1
    )
    with open(os.path.join(folder, corpus.MANIFEST), "w") as f:
        json.dump({"splits": splits, "n_episodes": len(scenarios) * tasks * per_task}, f)
    return folder


def write_real_like(path):
    """A one-episode .json file standing in for the real capture (small enough for T=128)."""
    with open(path, "w") as f:
        json.dump(small_episode(scenario="e_commerce_33", reward=0.0), f)
    return str(path)
