"""A capture's episodes on disk: one gzipped JSONL shard per scenario, written reproducibly.

Shards are written atomically (a temp file, then a rename), so a shard either is complete or
does not exist, and without a name or time in the gzip header, so equal episodes give equal
bytes. A rerun keeps a shard that holds exactly the requested (task_idx, k) grid for its seed.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from echo_jax.awm.world_format import World
from echo_jax.util.atomic import atomic_open

SHARD_SUFFIX = ".jsonl.gz"


def shard_path(out_dir: str | Path, scenario: str) -> Path:
    return Path(out_dir) / "episodes" / f"{scenario}{SHARD_SUFFIX}"


def read_shard(path: str | Path) -> Iterator[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            yield json.loads(line)


def write_shard(path: Path, episodes: list[dict[str, Any]]) -> None:
    """Write atomically and reproducibly (gzip header without file name or time)."""
    with (
        atomic_open(path, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as compressed,
    ):
        for episode in episodes:
            compressed.write((json.dumps(episode, ensure_ascii=False) + "\n").encode())


def shard_is_complete(path: Path, world: World, episodes_per_task: int, seed: int) -> bool:
    """True when the shard holds exactly the requested (task_idx, k) grid for this seed."""
    expected = [(t, k) for t in range(len(world.tasks)) for k in range(episodes_per_task)]
    try:
        found = [
            (episode["task_idx"], episode["capture"]["k"], episode["capture"]["seed"])
            for episode in read_shard(path)
        ]
    except (OSError, EOFError, ValueError, KeyError, TypeError):
        return False
    return [(t, k) for t, k, _ in found] == expected and all(s == seed for *_, s in found)
