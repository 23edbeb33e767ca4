"""A captured corpus folder: episode shards, a manifest, and the fixed train / held-out splits.

    corpus/manifest.json            how it was made, counts, and "splits"
    corpus/episodes/<scenario>.jsonl.gz

Splits are fixed once, in the manifest, so every run and every evaluation agrees on them:
  heldout_scenarios  whole scenarios of each domain (unseen data, known tools)
  heldout_tasks      some task indices of every remaining scenario (unseen parameters)
  train              everything else
The real e_commerce_33 capture (data/awm_e_commerce_33_task0.json) is one more held-out case.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable

import numpy as np

from echo_jax.config import SPLITS
from echo_jax.data import roles
from echo_jax.data.episode_files import load_episodes, require_regular_file
from echo_jax.data.episodes import Episode, EpisodeError
from echo_jax.data.packing import tokenize_episodes

MANIFEST = "manifest.json"
EPISODES_DIR = "episodes"


def domain_of(scenario: str) -> str:
    """AWM-style names end in a number: e_commerce_33 -> e_commerce."""
    return re.sub(r"_\d+$", "", scenario)


def assign_splits(
    tasks_per_scenario: dict[str, int],
    seed: int,
    scenarios_per_domain: int = 2,
    tasks_per_scenario_held: int = 2,
) -> dict[str, object]:
    """Chooses the held-out scenarios (per domain) and held-out task indices, deterministically."""
    rng = np.random.default_rng(seed)
    by_domain: dict[str, list[str]] = {}
    for name in sorted(tasks_per_scenario):
        by_domain.setdefault(domain_of(name), []).append(name)
    held_scenarios = []
    for domain in sorted(by_domain):
        names = by_domain[domain]
        k = min(scenarios_per_domain, len(names) - 1)
        held_scenarios += sorted(rng.choice(names, size=max(k, 0), replace=False).tolist())
    held_tasks = {}
    for name in sorted(tasks_per_scenario):
        if name not in held_scenarios:
            n = tasks_per_scenario[name]
            k = min(tasks_per_scenario_held, n - 1)
            held_tasks[name] = sorted(int(i) for i in rng.choice(n, size=k, replace=False))
    return {"heldout_scenarios": sorted(held_scenarios), "heldout_tasks": held_tasks}


def read_manifest(corpus_dir: str) -> dict:
    path = os.path.join(corpus_dir, MANIFEST)
    require_regular_file(path)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise EpisodeError(path, "<manifest>", f"cannot be read ({e})") from None
    if "splits" not in manifest:
        raise EpisodeError(path, "splits", "missing: the corpus has no train/held-out splits")
    return manifest


def is_corpus(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, MANIFEST))


def shard_files(corpus_dir: str) -> list[str]:
    """The corpus's episode shards; a missing `episodes/` folder (or a file in its place), or a
    manifest that is not a regular file, is an EpisodeError naming it."""
    require_regular_file(os.path.join(corpus_dir, MANIFEST))
    folder = os.path.join(corpus_dir, EPISODES_DIR)
    if not os.path.isdir(folder):
        problem = "not a folder" if os.path.lexists(folder) else "missing"
        raise EpisodeError(
            folder, "<folder>", f"{problem}: a corpus keeps its shards in {EPISODES_DIR}/"
        )
    try:
        names = os.listdir(folder)
    except OSError as e:
        raise EpisodeError(folder, "<folder>", f"cannot be read: {e.strerror}") from None
    files = sorted(os.path.join(folder, f) for f in names if f.endswith(".jsonl.gz"))
    for path in files:
        require_regular_file(path)
    return files


def split_of(splits: dict, scenario: str, task_idx: int) -> str:
    if scenario in splits["heldout_scenarios"]:
        return "heldout_scenarios"
    if task_idx in splits["heldout_tasks"].get(scenario, ()):
        return "heldout_tasks"
    return "train"


def select(episodes: Iterable[Episode], splits: dict, split: str) -> list[Episode]:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    return [ep for ep in episodes if split_of(splits, ep.scenario, ep.task_idx) == split]


def describe(corpus_dir: str, splits: dict) -> dict[str, object]:
    """Per-split episode counts and success rates, and cl100k token counts per role."""
    episodes = load_episodes(shard_files(corpus_dir))
    tokenized = tokenize_episodes(episodes, canonical_json=False)
    per_role = np.zeros(roles.NUM_ROLES, np.int64)
    for tok in tokenized:
        per_role += np.bincount(tok.roles, minlength=roles.NUM_ROLES)
    split_stats = {}
    for split in SPLITS:
        chosen = select(episodes, splits, split)
        groups = {(ep.scenario, ep.task_idx) for ep in chosen}
        split_stats[split] = {
            "episodes": len(chosen),
            "tasks": len(groups),
            "success_rate": float(np.mean([ep.reward >= 1.0 for ep in chosen])) if chosen else 0.0,
        }
    rewards_by_group: dict[tuple[str, int], set[float]] = {}
    for ep in episodes:
        rewards_by_group.setdefault(ep.group_key, set()).add(ep.reward)
    mixed = sum(len(r) > 1 for r in rewards_by_group.values())
    return {
        "split_stats": split_stats,
        "tokens_per_role": {
            n: int(c) for n, c in zip(roles.NAMES, per_role, strict=True) if n != "pad"
        },
        "straddles": int(sum(t.straddles for t in tokenized)),
        "groups_with_mixed_rewards": mixed / max(len(rewards_by_group), 1),
    }
