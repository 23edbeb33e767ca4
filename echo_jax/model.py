"""A small decoder-only transformer in Flax NNX: pre-RMSNorm blocks, rotary positions, causal
attention through `echo_jax.attention` (cuDNN's fused kernel on a GPU, query blocks on CPU).

Rows are left-aligned with PAD at the end, so causal attention alone keeps padding from
influencing any real position; no padding mask is needed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import Array

from echo_jax.attention import causal_attention
from echo_jax.attention import resolve as resolve_attention
from echo_jax.config import ModelConfig
from echo_jax.matmul import matmul


def _sin_cos(positions: Array, half: int) -> tuple[Array, Array]:
    """sin and cos [..., half] of the rotary angles at `positions`.

    Static positions (training, prefill) give tables computed once while tracing: traced ones
    let XLA fuse sin and cos into every [B, T, N, H/2] consumer, evaluating them B·N times
    over (about a tenth of a CPU train step). The values are the same either way.
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

    # --- KV-cache decoding (echo_jax.decoding); training uses __call__ only. ---

    def prefill(self, x_BTD: Array, positions_T: Array) -> tuple[Array, Array, Array]:
        """As __call__, also returning the rotated keys and the values [B, T, N, H] to cache."""
        b, t, _ = x_BTD.shape
        qkv = self.qkv(x_BTD).reshape(b, t, 3, self.n_heads, self.head_dim)
        q_BTNH, k_BTNH, v_BTNH = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q_BTNH, k_BTNH = rotary(q_BTNH, positions_T), rotary(k_BTNH, positions_T)
        y_BTNH = causal_attention(q_BTNH, k_BTNH, v_BTNH, self.impl)
        return self.out(y_BTNH.reshape(b, t, -1)), k_BTNH, v_BTNH

    def decode(
        self, x_B1D: Array, positions_B: Array, cache_k_BTNH: Array, cache_v_BTNH: Array
    ) -> tuple[Array, Array, Array]:
        """One new token per row at positions_B: writes its key/value into the cache, then
        attends to cache positions <= positions_B. Returns (output [B, 1, D], caches)."""
        b = x_B1D.shape[0]
        qkv = self.qkv(x_B1D).reshape(b, 1, 3, self.n_heads, self.head_dim)
        q_B1NH, k_B1NH, v_B1NH = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        positions_B1 = positions_B[:, None]
        q_B1NH, k_B1NH = rotary_rows(q_B1NH, positions_B1), rotary_rows(k_B1NH, positions_B1)
        rows_B = jnp.arange(b)
        cache_k_BTNH = cache_k_BTNH.at[rows_B, positions_B].set(k_B1NH[:, 0])
        cache_v_BTNH = cache_v_BTNH.at[rows_B, positions_B].set(v_B1NH[:, 0])
        q_BNH = q_B1NH[:, 0].astype(jnp.float32) * (self.head_dim**-0.5)
        scores_BNT = jnp.einsum("bnh,btnh->bnt", q_BNH, cache_k_BTNH.astype(jnp.float32))
        visible_BT = jnp.arange(cache_k_BTNH.shape[1])[None, :] <= positions_B[:, None]
        scores_BNT = jnp.where(visible_BT[:, None, :], scores_BNT, -jnp.inf)
        probs_BNT = jax.nn.softmax(scores_BNT, axis=-1)
        y_BNH = jnp.einsum("bnt,btnh->bnh", probs_BNT, cache_v_BTNH.astype(jnp.float32))
        y_B1D = y_BNH.reshape(b, 1, -1).astype(x_B1D.dtype)
        return self.out(y_B1D), cache_k_BTNH, cache_v_BTNH


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

    def prefill(self, x_BTD: Array, positions_T: Array) -> tuple[Array, Array, Array]:
        y_BTD, k_BTNH, v_BTNH = self.attn.prefill(self.norm1(x_BTD), positions_T)
        x_BTD = x_BTD + y_BTD
        return x_BTD + self.mlp(self.norm2(x_BTD)), k_BTNH, v_BTNH

    def decode(
        self, x_B1D: Array, positions_B: Array, cache_k_BTNH: Array, cache_v_BTNH: Array
    ) -> tuple[Array, Array, Array]:
        y_B1D, cache_k_BTNH, cache_v_BTNH = self.attn.decode(
            self.norm1(x_B1D), positions_B, cache_k_BTNH, cache_v_BTNH
        )
        x_B1D = x_B1D + y_B1D
        return x_B1D + self.mlp(self.norm2(x_B1D)), cache_k_BTNH, cache_v_BTNH


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

    # --- KV-cache decoding (echo_jax.decoding); training uses __call__ only. ---

    def prefill(self, tokens_BT: Array, lengths_B: Array) -> tuple[Array, Array, Array]:
        """Left-aligned prompts of lengths_B in rows of T -> (next-token logits [B, V] at each
        row's position lengths_B - 1, keys [L, B, T, N, H], values [L, B, T, N, H]).

        The forward pass is __call__'s, so cache entries below each length are exact; those at
        and after it hold padding and are overwritten by `decode_step` before they are visible.
        """
        x_BTD = self.embed(tokens_BT)
        positions_T = np.arange(x_BTD.shape[1])  # Static: see _sin_cos.
        keys, values = [], []
        for block in self.blocks:
            x_BTD, k_BTNH, v_BTNH = block.prefill(x_BTD, positions_T)
            keys.append(k_BTNH)
            values.append(v_BTNH)
        h_BTD = self.final_norm(x_BTD)
        last_B = jnp.clip(lengths_B - 1, 0, h_BTD.shape[1] - 1)
        h_B1D = h_BTD[jnp.arange(h_BTD.shape[0]), last_B][:, None]
        return self.logits(h_B1D)[:, 0], jnp.stack(keys), jnp.stack(values)

    def decode_step(
        self, tokens_B: Array, positions_B: Array, cache_k_LBTNH: Array, cache_v_LBTNH: Array
    ) -> tuple[Array, Array, Array]:
        """Feeds one token per row at positions_B -> (next-token logits [B, V], caches)."""
        x_B1D = self.embed(tokens_B[:, None])
        for layer, block in enumerate(self.blocks):
            x_B1D, k_BTNH, v_BTNH = block.decode(
                x_B1D, positions_B, cache_k_LBTNH[layer], cache_v_LBTNH[layer]
            )
            cache_k_LBTNH = cache_k_LBTNH.at[layer].set(k_BTNH)
            cache_v_LBTNH = cache_v_LBTNH.at[layer].set(v_BTNH)
        return self.logits(self.final_norm(x_B1D))[:, 0], cache_k_LBTNH, cache_v_LBTNH
