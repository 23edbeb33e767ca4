"""A checkpoint's own tokenizer (`tokenizer.json`, the `tokenizers` package) on a rendered
chat, each token tagged with the role of its characters.

`tokenizers` gives every token its character span in the text; a token takes the role of its
first character, and a token whose span covers two roles is a *straddle*, counted and reported
as `data.tokenizer` does for cl100k. The offsets fields of the result hold character offsets
(`data.tokenizer`'s hold bytes); packing only compares them with each other.
"""

from __future__ import annotations

import functools
import json
import os
from types import ModuleType

import numpy as np
from tokenizers import Tokenizer

from echo_jax.data.chat_template import check_chat_template
from echo_jax.data.render import Rendered
from echo_jax.data.tokenizer import TokenizedEpisode
from echo_jax.util.atomic import atomic_write_text
from echo_jax.util.choices import ConfigError

TOKENIZER_FILE = "tokenizer.json"


@functools.cache
def load_tokenizer(folder: str) -> Tokenizer:
    return Tokenizer.from_file(os.path.join(folder, TOKENIZER_FILE))


def tokenize_chat(rendered: Rendered, tok: Tokenizer) -> TokenizedEpisode:
    texts = [text for text, _ in rendered.segments]
    seg_chars = np.fromiter((len(t) for t in texts), np.int64, len(texts))
    seg_roles = np.fromiter((r for _, r in rendered.segments), np.int8, len(texts))
    char_roles = np.repeat(seg_roles, seg_chars)
    seg_offsets = np.concatenate([[0], np.cumsum(seg_chars)])

    enc = tok.encode(rendered.text, add_special_tokens=False)
    ids = np.asarray(enc.ids, np.int32)
    spans = np.asarray(enc.offsets, np.int64).reshape(-1, 2)
    start, end = spans[:, 0], np.maximum(spans[:, 1], spans[:, 0] + 1)
    if ids.size and (end.max() > char_roles.size or np.any(np.diff(start) < 0)):
        raise AssertionError("token offsets do not follow the rendered text")
    # Role-change count before each character: a token straddles if it differs across its span.
    changes = np.concatenate([[0], np.cumsum(np.diff(char_roles) != 0)])
    straddle = changes[np.minimum(end, char_roles.size) - 1] != changes[start]
    return TokenizedEpisode(
        ids=ids,
        roles=char_roles[start] if ids.size else np.zeros(0, np.int8),
        byte_start=start,
        prefix_bytes=int(seg_offsets[rendered.prefix_segments]),
        step_start_bytes=seg_offsets[list(rendered.step_starts)].astype(np.int64),
        straddles=int(straddle.sum()),
    )


def _byte_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's bytes_to_unicode) back to bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


class HFVocab:
    """A checkpoint's tokenizer as the vocabulary the data pipeline, agent and decoder use (the
    interface of data.vocab.Vocab): ids are the model's own (no compaction), episodes render in
    the chat layout its chat template matches (data.chat_template), and `size` is the model's
    vocabulary (config.json's vocab_size, which may exceed the tokenizer's: those ids decode to
    nothing)."""

    def __init__(self, folder: str | os.PathLike, size: int | None = None):
        self.folder = os.path.abspath(folder)
        self.tok = load_tokenizer(self.folder)
        if size is None:
            with open(os.path.join(self.folder, "config.json")) as f:
                size = int(json.load(f)["vocab_size"])
        self.size = size
        decoder = json.loads(self.tok.to_str()).get("decoder") or {}
        if decoder.get("type") != "ByteLevel":
            raise ConfigError(
                f"{self.folder}: tokenizer decoder type {decoder.get('type')!r} is not "
                "supported (only byte-level BPE, as Qwen3 and Llama 3 use)"
            )
        self.layout: ModuleType = check_chat_template(self.folder)  # As its chat would.

    def tokenize(self, rendered: Rendered) -> TokenizedEpisode:
        return tokenize_chat(rendered, self.tok)

    def expand(self, ids_N: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The identity: (ids, source token of each, byte within it = 0)."""
        ids_N = np.asarray(ids_N, np.int32)
        return ids_N, np.arange(ids_N.size), np.zeros(ids_N.size, np.int64)

    def encode_text(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, np.int32)

    @functools.cached_property
    def _table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        byte_of = _byte_decoder()
        added = {i: t.content for i, t in self.tok.get_added_tokens_decoder().items()}
        pieces = []
        for i in range(self.size):
            token = self.tok.id_to_token(i)
            if i in added:
                pieces.append(added[i].encode())
            elif token is None:
                pieces.append(b"")
            else:
                pieces.append(bytes(byte_of[c] for c in token))
        length = np.fromiter((len(p) for p in pieces), np.int64, len(pieces))
        start = np.concatenate([[0], np.cumsum(length)[:-1]]).astype(np.int64)
        return np.frombuffer(b"".join(pieces), np.uint8), start, length

    def token_byte_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(flat bytes, start [V], length [V]) of every id's bytes (special tokens: their text)."""
        return self._table

    def decode_bytes(self, ids: np.ndarray) -> bytes:
        flat, start, length = self._table
        ids = np.asarray(ids, np.int64)
        return b"".join(flat[start[i] : start[i] + length[i]].tobytes() for i in ids)

    def decode(self, ids: np.ndarray) -> str:
        return self.decode_bytes(ids).decode("utf-8")

    def to_json(self) -> str:
        return json.dumps({"hf_path": self.folder, "size": self.size})

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, self.to_json())
