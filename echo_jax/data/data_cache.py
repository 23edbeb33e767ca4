"""A content-addressed cache of packed training arrays, so a rerun skips render + tokenise + pack.

The key hashes everything the arrays depend on: the bytes of every input file (corpus manifests
and shards included), every DataConfig setting but cache_dir, the vocabulary when one is given,
the tokenizer's encoding and version, and the source of the modules that turn episodes into
arrays. Change any of them and the old entry is simply never read again. Entries are written
atomically (a temporary file, then a rename), so a crash or two concurrent writers leave either
no entry or a whole one; an unreadable entry is treated as a miss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import importlib.util
import json
import os

import numpy as np
import tiktoken

from echo_jax.config import DataConfig
from echo_jax.data import corpus, tokenizer
from echo_jax.data.episode_files import expand_paths
from echo_jax.data.packing import PackedData, PackStats
from echo_jax.data.vocab import Vocab
from echo_jax.util.atomic import atomic_open

FORMAT = 1  # Bump when the entry layout changes.
# Modules whose code decides the packed arrays; editing any of them invalidates the cache.
PIPELINE_MODULES = (
    "echo_jax.data.advantages",
    "echo_jax.data.corpus",
    "echo_jax.data.data_cache",
    "echo_jax.data.dataset",
    "echo_jax.data.episode_files",
    "echo_jax.data.episodes",
    "echo_jax.data.packing",
    "echo_jax.data.render",
    "echo_jax.data.roles",
    "echo_jax.data.tokenizer",
    "echo_jax.data.vocab",
)
_ARRAYS = tuple(f.name for f in dataclasses.fields(PackedData) if f.name != "stats")


def input_files(cfg: DataConfig) -> list[str]:
    """Every file the episodes are read from, in a stable order."""
    files: list[str] = []
    for path in cfg.paths:
        if corpus.is_corpus(path):
            files.append(os.path.join(path, corpus.MANIFEST))
            files += corpus.shard_files(path)
        else:
            files += expand_paths([path])
    return files


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _source_digest() -> str:
    h = hashlib.sha256()
    for name in PIPELINE_MODULES:
        origin = importlib.util.find_spec(name).origin
        with open(origin, "rb") as f:
            h.update(name.encode() + b"\0" + f.read() + b"\0")
    return h.hexdigest()


def cache_key(cfg: DataConfig, vocab: Vocab | None) -> str | None:
    """The entry's hex key, or None when caching is off or the inputs cannot be listed (the
    uncached path then reports the problem)."""
    if not cfg.cache_dir or (vocab is not None and not isinstance(vocab, Vocab)):
        return None  # A checkpoint's own tokenizer (HFVocab): not cached.
    try:
        files = input_files(cfg)
        digests = [(os.path.abspath(p), _file_digest(p)) for p in files]
    except (OSError, ValueError):  # EpisodeError is a ValueError.
        return None
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "cache_dir"}
    settings["paths"] = list(cfg.paths)
    parts = {
        "format": FORMAT,
        "settings": settings,
        "files": digests,
        "vocab": None if vocab is None else hashlib.sha256(vocab.cl100k_ids.tobytes()).hexdigest(),
        "encoding": [tokenizer.ENCODING_NAME, tiktoken.__version__],
        "source": _source_digest(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def entry_path(cache_dir: str, key: str) -> str:
    return os.path.join(os.path.expanduser(cache_dir), f"packed-{key[:40]}.npz")


def load(cfg: DataConfig, key: str | None) -> tuple[PackedData, Vocab] | None:
    if key is None:
        return None
    path = entry_path(cfg.cache_dir, key)
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta["key"] != key:
                return None
            arrays = {name: z[name] for name in _ARRAYS}
            vocab = Vocab(z["vocab_cl100k_ids"])
    except (OSError, KeyError, ValueError, EOFError):
        return None
    stats = meta["stats"]
    stats = PackStats(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in stats.items()},
    )
    return PackedData(**arrays, stats=stats), vocab


def save(cfg: DataConfig, key: str | None, data: PackedData, vocab: Vocab) -> None:
    """Writes the entry; a cache that cannot be written only costs the next run its speed."""
    if key is None:
        return
    meta = {"key": key, "stats": dataclasses.asdict(data.stats)}
    with contextlib.suppress(OSError), atomic_open(entry_path(cfg.cache_dir, key), "wb") as f:
        np.savez(
            f,
            meta=np.asarray(json.dumps(meta)),
            vocab_cl100k_ids=vocab.cl100k_ids,
            **{name: getattr(data, name) for name in _ARRAYS},
        )


def clear(cache_dir: str) -> int:
    """Removes every entry under cache_dir; returns how many."""
    paths = glob.glob(os.path.join(os.path.expanduser(cache_dir), "packed-*.npz"))
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return len(paths)
