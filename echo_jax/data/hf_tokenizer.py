"""A checkpoint's own tokenizer (`tokenizer.json`, the `tokenizers` package) on a rendered
chat, each token tagged with the role of its characters.

`tokenizers` gives every token its character span in the text; a token takes the role of its
first character, and a token whose span covers two roles is a *straddle*, counted and reported
as `data.tokenizer` does for cl100k. The offsets fields of the result hold character offsets
(`data.tokenizer`'s hold bytes); packing only compares them with each other.
"""

from __future__ import annotations

import functools
import os

import numpy as np
from tokenizers import Tokenizer

from echo_jax.data.render import Rendered
from echo_jax.data.tokenizer import TokenizedEpisode

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
