"""The one model interface the trainer, the losses and the rollout engine call.

`transformer.Transformer` (the tiny model) and `hf.HFDecoder` (Qwen3 and Llama checkpoints)
both implement it; nothing downstream knows which it has.
"""

from __future__ import annotations

from typing import Protocol

from jax import Array

KVCache = tuple[tuple[Array, Array], ...]  # Per layer (keys, values) [S, heads, T, H].


class CausalLM(Protocol):
    def features(self, tokens_BT: Array) -> Array:
        """tokens [B, T] -> final-norm features [B, T, D]."""

    def output_matrix(self) -> Array:
        """[D, V]: logits = features @ output_matrix (the chunked loss never builds them)."""

    def logits(self, h_BTD: Array) -> Array: ...

    def __call__(self, tokens_BT: Array) -> Array:
        """tokens [B, T] -> logits [B, T, V]."""

    def empty_cache(self, rows: int, max_len: int) -> KVCache: ...

    def extend(
        self,
        tokens_RC: Array,
        start_R: Array,
        count_R: Array,
        cache: KVCache,
        rows_R: Array | None = None,
    ) -> tuple[Array, KVCache]:
        """Appends count_R tokens per row at positions start_R on -> (next logits [R, V], cache)."""
