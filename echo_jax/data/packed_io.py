"""Saving and loading packed training arrays (`PackedData`) as one `.npz` file.

The file is written atomically (temp file, then rename) without pickles, and everything in it is
checked on load: the arrays present with their dtypes, consistent shapes, every role value inside
the role table (`roles.validate`), token ids inside the vocabulary, finite rewards and advantages.
A file that fails any check raises PackedFileError naming the file and the array; nothing from a
bad file reaches training.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile

import numpy as np

from echo_jax.data import roles
from echo_jax.data.packing import PackedData, PackStats
from echo_jax.util.atomic import atomic_open

FORMAT_VERSION = 1
_ROW_ARRAYS = {"tokens": np.int32, "roles": np.int8}  # [N, T]
_PER_ROW = {"reward": np.float32, "group": np.int32, "episode": np.int32, "advantage": np.float32}


class PackedFileError(ValueError):
    """A saved packed-array file that is unreadable or inconsistent; names the file and array."""

    def __init__(self, path: str | os.PathLike, array: str, problem: str):
        self.path, self.array, self.problem = os.fspath(path), array, problem
        super().__init__(f"{self.path}: array '{array}': {problem}")


def save_packed(path: str | os.PathLike, data: PackedData) -> None:
    """Writes `data` to `path` (an .npz) atomically: a complete file or none."""
    roles.validate(data.roles, "packed data being saved")
    arrays = {name: getattr(data, name) for name in (*_ROW_ARRAYS, *_PER_ROW)}
    meta = {"format_version": FORMAT_VERSION, "stats": dataclasses.asdict(data.stats)}
    with atomic_open(path, "wb") as f:
        np.savez(f, meta=np.array(json.dumps(meta)), **arrays)


def load_packed_file(path: str | os.PathLike, vocab_size: int | None = None) -> PackedData:
    """Reads and checks a file written by `save_packed`; raises PackedFileError if it is bad."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            contents = {name: npz[name] for name in npz.files}
    except FileNotFoundError:
        raise PackedFileError(path, "<file>", "does not exist") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise PackedFileError(path, "<file>", f"not a readable .npz file ({e})") from None
    meta = _meta(path, contents)
    for name, dtype in {**_ROW_ARRAYS, **_PER_ROW}.items():
        if name not in contents:
            raise PackedFileError(path, name, "missing")
        if contents[name].dtype != dtype:
            raise PackedFileError(
                path, name, f"dtype {contents[name].dtype}, expected {np.dtype(dtype)}"
            )
    tokens, role_arr = contents["tokens"], contents["roles"]
    if tokens.ndim != 2 or role_arr.shape != tokens.shape:
        raise PackedFileError(
            path, "roles", f"shape {role_arr.shape} does not match tokens {tokens.shape} [N, T]"
        )
    n = tokens.shape[0]
    for name in _PER_ROW:
        if contents[name].shape != (n,):
            raise PackedFileError(path, name, f"shape {contents[name].shape}, expected ({n},)")
    try:
        roles.validate(role_arr, f"{os.fspath(path)}: array 'roles'")
    except ValueError as e:
        raise PackedFileError(path, "roles", str(e).split(": array 'roles': ", 1)[-1]) from None
    if tokens.size:
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or (vocab_size is not None and high >= vocab_size):
            bad = low if low < 0 else high
            raise PackedFileError(path, "tokens", f"token id {bad} outside the vocabulary")
    for name in ("reward", "advantage"):
        if not np.all(np.isfinite(contents[name])):
            raise PackedFileError(path, name, "holds non-finite values")
    for name in ("group", "episode"):
        if n and contents[name].min() < 0:
            raise PackedFileError(path, name, "holds negative indices")
    try:
        stats = PackStats(**{k: _tuple(v) for k, v in meta["stats"].items()})
    except TypeError as e:
        raise PackedFileError(path, "meta", f"bad stats ({e})") from None
    return PackedData(
        tokens=tokens,
        roles=role_arr,
        reward=contents["reward"],
        group=contents["group"],
        episode=contents["episode"],
        advantage=contents["advantage"],
        stats=stats,
    )


def _tuple(value):
    return tuple(value) if isinstance(value, list) else value


def _meta(path, contents: dict[str, np.ndarray]) -> dict:
    if "meta" not in contents:
        raise PackedFileError(path, "meta", "missing")
    try:
        meta = json.loads(str(contents["meta"]))
    except json.JSONDecodeError as e:
        raise PackedFileError(path, "meta", f"invalid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise PackedFileError(
            path, "meta", f"format version {version!r}, expected {FORMAT_VERSION}"
        )
    if not isinstance(meta.get("stats"), dict):
        raise PackedFileError(path, "meta", "missing stats")
    return meta
