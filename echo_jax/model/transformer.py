"""A small decoder-only transformer in Flax NNX: pre-RMSNorm blocks, rotary positions, causal
attention through `echo_jax.model.attention` (cuDNN's fused kernel on a GPU, query blocks on CPU).

Rows are left-aligned with PAD at the end, so causal attention alone keeps padding from
influencing any real position; no padding mask is needed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import Array

from echo_jax.config import ModelConfig
from echo_jax.model.attention import causal_attention
from echo_jax.model.attention import resolve as resolve_attention
from echo_jax.model.matmul import matmul

# Per layer, (keys, values) [S, N, T, H]: the KV cache of S rows of T positions.
KVCache = tuple[tuple[Array, Array], ...]


def _sin_cos(positions: Array, half: int) -> tuple[Array, Array]:
    """sin and cos [..., half] of the rotary angles at `positions`.

    Static positions (training, prefill) give tables computed once while tracing: traced ones
    let XLA fuse sin and cos into every [B, T, N, H/2] consumer, evaluating them B·N times
    over, a cost that shows in the CPU train step `benchmarks/train_step_vs_torch.py` times.
    The values are the same either way.
    """
    with jax.ensure_compile_time_eval():
        freq = 1.0 / (10_000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
        angle = jnp.asarray(positions)[..., None].astype(jnp.float32) * freq
        return jnp.sin(angle), jnp.cos(angle)


def _rotate(x: Array, sin: Array, cos: Array) -> Array:
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def rotary(x_BTNH: Array, positions_T: Array) -> Array:
    """Rotary position embedding on the last axis (halves rotated)."""
    sin_TH, cos_TH = _sin_cos(positions_T, x_BTNH.shape[-1] // 2)
    return _rotate(x_BTNH, sin_TH[None, :, None, :], cos_TH[None, :, None, :])


def rotary_rows(x_BSNH: Array, positions_BS: Array) -> Array:
    """`rotary` with a position per row (incremental decoding: rows at different lengths)."""
    sin_BSH, cos_BSH = _sin_cos(positions_BS, x_BSNH.shape[-1] // 2)
    return _rotate(x_BSNH, sin_BSH[:, :, None, :], cos_BSH[:, :, None, :])


def _linear(d_in: int, d_out: int, std: float, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    """A bias-free projection with normal(std) weights."""
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=False,
        dtype=dtype,
        kernel_init=nnx.initializers.normal(std),
        rngs=rngs,
    )


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.impl = resolve_attention(cfg)  # "cudnn" on a GPU in bfloat16, else "xla".
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        std, out_std = cfg.d_model**-0.5, (cfg.d_model * 2 * cfg.n_layers) ** -0.5
        self.qkv = _linear(cfg.d_model, 3 * cfg.d_model, std, dtype, rngs)
        self.out = _linear(cfg.d_model, cfg.d_model, out_std, dtype, rngs)

    def __call__(self, x_BTD: Array, positions_T: Array) -> Array:
        # Projections on [B·T, D] rows: a 3-D operand makes XLA CPU transpose its gradients.
        b, t, d = x_BTD.shape
        qkv = self.qkv(x_BTD.reshape(b * t, d)).reshape(b, t, 3, self.n_heads, self.head_dim)
        q_BTNH, k_BTNH, v_BTNH = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q_BTNH, k_BTNH = rotary(q_BTNH, positions_T), rotary(k_BTNH, positions_T)
        y_BTNH = causal_attention(q_BTNH, k_BTNH, v_BTNH, self.impl)
        return self.out(y_BTNH.reshape(b * t, d)).reshape(b, t, d)

    # --- KV-cache decoding (echo_jax.agent.decoding); training uses __call__ only. ---

    def extend(
        self,
        x_RCD: Array,
        rows_R: Array | None,
        positions_RC: Array,
        write_RC: Array,
        cache: tuple[Array, Array],
    ) -> tuple[Array, tuple[Array, Array]]:
        """C new tokens for each of the cache rows rows_R (None: every row, in order), at
        positions_RC: writes their keys and values where write_RC (elsewhere the write is
        dropped), then each attends to its row's cache positions at or before its own.
        Returns (output [R, C, D], (keys, values) [S, N, T, H])."""
        r, c, d = x_RCD.shape
        qkv = self.qkv(x_RCD.reshape(r * c, d)).reshape(r, c, 3, self.n_heads, self.head_dim)
        q_RCNH, k_RCNH, v_RCNH = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q_RCNH, k_RCNH = rotary_rows(q_RCNH, positions_RC), rotary_rows(k_RCNH, positions_RC)
        cache_k_SNTH, cache_v_SNTH = cache
        t = cache_k_SNTH.shape[2]
        slots_RC = jnp.where(write_RC, positions_RC, t)  # Out of range: dropped.
        # Heads before positions, so both products below read the cache without a transpose.
        k_RNCH, v_RNCH = k_RCNH.transpose(0, 2, 1, 3), v_RCNH.transpose(0, 2, 1, 3)
        cache_k_SNTH = _write(cache_k_SNTH, rows_R, k_RNCH, slots_RC)
        cache_v_SNTH = _write(cache_v_SNTH, rows_R, v_RNCH, slots_RC)
        if rows_R is None:  # Every row, in order: the cache itself, not a gathered copy.
            keys_RNTH, values_RNTH = cache_k_SNTH, cache_v_SNTH
        else:
            keys_RNTH, values_RNTH = cache_k_SNTH[rows_R], cache_v_SNTH[rows_R]
        q_RNCH = q_RCNH.transpose(0, 2, 1, 3).astype(jnp.float32) * (self.head_dim**-0.5)
        scores_RNCT = jnp.einsum("rnch,rnth->rnct", q_RNCH, keys_RNTH.astype(jnp.float32))
        visible_RCT = jnp.arange(t)[None, None, :] <= positions_RC[:, :, None]
        scores_RNCT = jnp.where(visible_RCT[:, None], scores_RNCT, -jnp.inf)
        probs_RNCT = jax.nn.softmax(scores_RNCT, axis=-1)
        y_RNCH = jnp.einsum("rnct,rnth->rnch", probs_RNCT, values_RNTH.astype(jnp.float32))
        y_ND = y_RNCH.transpose(0, 2, 1, 3).reshape(r * c, d).astype(x_RCD.dtype)
        return self.out(y_ND).reshape(r, c, d), (cache_k_SNTH, cache_v_SNTH)


def _write(cache_SNTH: Array, rows_R: Array, new_RNCH: Array, slots_RC: Array) -> Array:
    """cache[rows[r], :, slots[r, c]] = new[r, :, c]; slots out of range are dropped."""
    r, n, c, _ = new_RNCH.shape
    rows_R = jnp.arange(r) if rows_R is None else rows_R
    rows = jnp.broadcast_to(rows_R[:, None, None], (r, n, c))
    heads = jnp.broadcast_to(jnp.arange(n)[None, :, None], (r, n, c))
    slots = jnp.broadcast_to(slots_RC[:, None, :], (r, n, c))
    return cache_SNTH.at[rows, heads, slots].set(new_RNCH, mode="drop")


class Mlp(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        std, out_std = cfg.d_model**-0.5, (cfg.d_ff * 2 * cfg.n_layers) ** -0.5
        self.up = _linear(cfg.d_model, cfg.d_ff, std, dtype, rngs)
        self.down = _linear(cfg.d_ff, cfg.d_model, out_std, dtype, rngs)

    def __call__(self, x_BTD: Array) -> Array:
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])  # 2-D, as in Attention.
        return self.down(jax.nn.gelu(self.up(x_ND))).reshape(x_BTD.shape)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.norm1 = nnx.RMSNorm(cfg.d_model, dtype=dtype, rngs=rngs)
        self.attn = Attention(cfg, dtype, rngs)
        self.norm2 = nnx.RMSNorm(cfg.d_model, dtype=dtype, rngs=rngs)
        self.mlp = Mlp(cfg, dtype, rngs)

    def __call__(self, x_BTD: Array, positions_T: Array) -> Array:
        x_BTD = x_BTD + self.attn(self.norm1(x_BTD), positions_T)
        return x_BTD + self.mlp(self.norm2(x_BTD))

    def extend(self, x_RCD, rows_R, positions_RC, write_RC, cache):
        y_RCD, cache = self.attn.extend(self.norm1(x_RCD), rows_R, positions_RC, write_RC, cache)
        x_RCD = x_RCD + y_RCD
        return x_RCD + self.mlp(self.norm2(x_RCD)), cache


class Transformer(nnx.Module):
    """tokens [B, T] -> logits [B, T, V]; `features` + `logits` split it for fused losses."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        self.tie_embeddings = cfg.tie_embeddings
        self.embed = nnx.Embed(
            vocab_size,
            cfg.d_model,
            dtype=dtype,
            embedding_init=nnx.initializers.normal(1.0),
            rngs=rngs,
        )
        self.blocks = nnx.List([Block(cfg, dtype, rngs) for _ in range(cfg.n_layers)])
        self.final_norm = nnx.RMSNorm(cfg.d_model, dtype=dtype, rngs=rngs)
        if not cfg.tie_embeddings:
            self.unembed = _linear(cfg.d_model, vocab_size, cfg.d_model**-0.5, dtype, rngs)

    def features(self, tokens_BT: Array) -> Array:
        return self.features_from_embeddings(self.embed(tokens_BT))

    def features_from_embeddings(self, x_BTD: Array) -> Array:
        positions_T = np.arange(x_BTD.shape[1])  # Static: see _sin_cos.
        for block in self.blocks:
            x_BTD = block(x_BTD, positions_T)
        return self.final_norm(x_BTD)

    def output_matrix(self) -> Array:
        """[D, V] projection from features to logits."""
        if self.tie_embeddings:
            return self.embed.embedding[...].T * (self.embed.embedding.shape[1] ** -0.5)
        return self.unembed.kernel[...]

    def logits(self, h_BTD: Array) -> Array:
        w_DV = self.output_matrix().astype(h_BTD.dtype)
        b, t, d = h_BTD.shape
        return matmul(h_BTD.reshape(b * t, d), w_DV).reshape(b, t, -1)  # 2-D, as in Attention.

    def __call__(self, tokens_BT: Array) -> Array:
        return self.logits(self.features(tokens_BT))

    # --- KV-cache decoding (echo_jax.agent.decoding); training uses __call__ only. ---

    def empty_cache(self, rows: int, max_len: int) -> KVCache:
        """Keys and values of `rows` rows of `max_len` positions, per layer, all zero."""
        attn = self.blocks[0].attn
        shape = (rows, attn.n_heads, max_len, attn.head_dim)
        dtype = attn.qkv.dtype or attn.qkv.param_dtype
        return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in self.blocks)

    def extend(
        self,
        tokens_RC: Array,
        start_R: Array,
        count_R: Array,
        cache: KVCache,
        rows_R: Array | None = None,
    ) -> tuple[Array, KVCache]:
        """Appends count_R (<= C) tokens to cache rows rows_R (default: all, in order, read
        in place), at positions start_R onwards -> (next-token logits [R, V] after each row's
        last new token, the cache).

        The arithmetic is __call__'s, so a row's logits equal the training forward pass's over
        the same tokens (rows with count 0 are left as they were; their logits are arbitrary).
        C = 1 is one decoding step; a prompt is appended in chunks. Only the rows named are
        computed, so appending to a few rows of a large cache costs a few rows.
        """
        r, c = tokens_RC.shape
        positions_RC = start_R[:, None] + jnp.arange(c)[None, :]
        write_RC = jnp.arange(c)[None, :] < count_R[:, None]
        x_RCD = self.embed(tokens_RC)
        new_cache = []
        for block, layer_cache in zip(self.blocks, cache, strict=True):
            x_RCD, layer_cache = block.extend(x_RCD, rows_R, positions_RC, write_RC, layer_cache)
            new_cache.append(layer_cache)
        last_R = jnp.clip(count_R - 1, 0, c - 1)
        h_R1D = self.final_norm(x_RCD[jnp.arange(r), last_R][:, None])
        return self.logits(h_R1D)[:, 0], tuple(new_cache)
