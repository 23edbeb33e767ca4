"""A compact vocabulary over cl100k, built from the training data, with a lossless byte fallback.

A tiny model cannot afford a 100k-row softmax. Compact id 0 is PAD, ids 1..256 are the 256
single-byte cl100k tokens, and the rest are the training data's most frequent cl100k tokens. A
cl100k token outside the vocabulary becomes its bytes, so decode(encode(text)) == text always.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from types import ModuleType

import numpy as np

from echo_jax.data import render, tokenizer
from echo_jax.data.render import Rendered
from echo_jax.util.atomic import atomic_write_text

PAD_ID = 0
NUM_BYTES = 256
FIRST_LEARNED_ID = 1 + NUM_BYTES


@dataclasses.dataclass(frozen=True)
class Vocab:
    cl100k_ids: np.ndarray  # int32 [V]: the cl100k id of each compact id (entry 0, PAD, is -1)

    @property
    def size(self) -> int:
        return int(self.cl100k_ids.size)

    # --- What the data pipeline, the agent and the decoder ask of a vocabulary; the other one
    # is data.hf_tokenizer.HFVocab (a checkpoint's own tokenizer). ---

    @property
    def layout(self) -> ModuleType:
        """How episodes are rendered as text: data.render's markers."""
        return render

    def tokenize(self, rendered: Rendered) -> tokenizer.TokenizedEpisode:
        """cl100k ids and roles of a rendering (`expand` maps them to this vocabulary)."""
        return tokenizer.tokenize_rendered(rendered)

    def token_byte_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(flat bytes, start [V], length [V]) of each compact id's bytes (PAD: none)."""
        table = tokenizer.byte_table()
        ids = np.maximum(self.cl100k_ids, 0)
        length = np.where(self.cl100k_ids >= 0, table.length[ids], 0)
        return table.flat, table.start[ids], length

    def decode_bytes(self, compact_ids: np.ndarray) -> bytes:
        ids = np.asarray(compact_ids)
        ids = ids[ids != PAD_ID]
        return tokenizer.encoding().decode_bytes(self.cl100k_ids[ids].tolist())

    @functools.cached_property
    def lookup(self) -> np.ndarray:
        """int32 [cl100k n_vocab]: compact id of each cl100k id, -1 where absent."""
        table = np.full(tokenizer.encoding().n_vocab, -1, np.int32)
        table[self.cl100k_ids[1:]] = np.arange(1, self.size, dtype=np.int32)
        return table

    def expand(self, ids_N: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """cl100k ids -> (compact ids [M], source token of each [M], byte within it [M]).

        A known token maps to one compact id; an unknown one to one byte token per byte.
        """
        table = tokenizer.byte_table()
        compact = self.lookup[ids_N]
        known = compact >= 0
        counts = np.where(known, 1, table.length[ids_N])
        src = np.repeat(np.arange(ids_N.size), counts)
        within = np.arange(src.size) - np.repeat(np.cumsum(counts) - counts, counts)
        fallback = 1 + table.flat[table.start[ids_N[src]] + within].astype(np.int32)
        return np.where(known[src], compact[src], fallback).astype(np.int32), src, within

    def encode_text(self, text: str) -> np.ndarray:
        return self.expand(np.asarray(tokenizer.encoding().encode_ordinary(text), np.int32))[0]

    def decode(self, compact_ids: np.ndarray) -> str:
        """Text of compact ids, PAD skipped."""
        return self.decode_bytes(compact_ids).decode("utf-8")

    def to_json(self) -> str:
        return json.dumps(
            {"encoding": tokenizer.ENCODING_NAME, "cl100k_ids": self.cl100k_ids.tolist()}
        )

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocab:
        with open(path) as f:
            data = json.load(f)
        if data.get("encoding") != tokenizer.ENCODING_NAME:
            raise ValueError(f"{path}: vocabulary built for {data.get('encoding')!r}")
        return cls(np.asarray(data["cl100k_ids"], np.int32))


def build_vocab(token_streams: list[np.ndarray], max_size: int, min_count: int = 1) -> Vocab:
    """PAD, the 256 bytes, then the most frequent cl100k tokens (ties by id) up to `max_size`."""
    n_vocab = tokenizer.encoding().n_vocab
    counts = np.zeros(n_vocab, np.int64)
    for ids in token_streams:
        counts += np.bincount(ids, minlength=n_vocab)
    singles = tokenizer.byte_table().single_byte_ids
    counts[singles] = 0  # Always present already.
    order = np.lexsort((np.arange(n_vocab), -counts))  # By count desc, then id asc.
    chosen = order[counts[order] >= min_count][: max(0, max_size - FIRST_LEARNED_ID)]
    ids = np.concatenate([[-1], singles, chosen]).astype(np.int32)
    return Vocab(ids)


def full_vocab() -> Vocab:
    """Every cl100k id, independent of the data: PAD, the 256 bytes, then the rest by id.

    1 + 100,277 rows; no token ever falls back to bytes. Meant for LossConfig.impl="chunked".
    """
    n_vocab = tokenizer.encoding().n_vocab
    singles = tokenizer.byte_table().single_byte_ids
    rest = np.setdiff1d(np.arange(n_vocab, dtype=np.int32), singles)
    return Vocab(np.concatenate([[-1], singles, rest]).astype(np.int32))


def load_vocab(path: str | os.PathLike):
    """A run's saved vocabulary: a compact Vocab, or the HFVocab of the checkpoint it names."""
    with open(path) as f:
        data = json.load(f)
    if "hf_path" in data:
        from echo_jax.data.hf_tokenizer import HFVocab

        return HFVocab(data["hf_path"], data["size"])
    return Vocab.load(path)
