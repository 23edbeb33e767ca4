"""A small decoder-only transformer in Flax NNX: pre-RMSNorm blocks, rotary positions, causal
attention through `jax.nn.dot_product_attention` (cuDNN's fused kernel where it is present).

Rows are left-aligned with PAD at the end, so causal attention alone keeps padding from
influencing any real position; no padding mask is needed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax import Array

from echo_jax.config import ModelConfig


def rotary(x_BTNH: Array, positions_T: Array) -> Array:
    """Rotary position embedding on the last axis (halves rotated)."""
    half = x_BTNH.shape[-1] // 2
    freq_H = 1.0 / (10_000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
    angle_TH = positions_T[:, None].astype(jnp.float32) * freq_H[None, :]
    sin, cos = jnp.sin(angle_TH)[None, :, None, :], jnp.cos(angle_TH)[None, :, None, :]
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        init = nnx.initializers.normal(cfg.d_model**-0.5)
        out_init = nnx.initializers.normal((cfg.d_model * 2 * cfg.n_layers) ** -0.5)
        self.qkv = nnx.Linear(
            cfg.d_model, 3 * cfg.d_model, use_bias=False, dtype=dtype, kernel_init=init, rngs=rngs
        )
        self.out = nnx.Linear(
            cfg.d_model, cfg.d_model, use_bias=False, dtype=dtype, kernel_init=out_init, rngs=rngs
        )

    def __call__(self, x_BTD: Array, positions_T: Array) -> Array:
        b, t, _ = x_BTD.shape
        qkv = self.qkv(x_BTD).reshape(b, t, 3, self.n_heads, self.head_dim)
        q_BTNH, k_BTNH, v_BTNH = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q_BTNH, k_BTNH = rotary(q_BTNH, positions_T), rotary(k_BTNH, positions_T)
        y_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BTNH, v_BTNH, is_causal=True)
        return self.out(y_BTNH.reshape(b, t, -1))


class Mlp(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(cfg.d_model**-0.5)
        out_init = nnx.initializers.normal((cfg.d_ff * 2 * cfg.n_layers) ** -0.5)
        self.up = nnx.Linear(
            cfg.d_model, cfg.d_ff, use_bias=False, dtype=dtype, kernel_init=init, rngs=rngs
        )
        self.down = nnx.Linear(
            cfg.d_ff, cfg.d_model, use_bias=False, dtype=dtype, kernel_init=out_init, rngs=rngs
        )

    def __call__(self, x_BTD: Array) -> Array:
        return self.down(jax.nn.gelu(self.up(x_BTD)))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.norm1 = nnx.RMSNorm(cfg.d_model, dtype=dtype, rngs=rngs)
        self.attn = Attention(cfg, dtype, rngs)
        self.norm2 = nnx.RMSNorm(cfg.d_model, dtype=dtype, rngs=rngs)
        self.mlp = Mlp(cfg, dtype, rngs)

    def __call__(self, x_BTD: Array, positions_T: Array) -> Array:
        x_BTD = x_BTD + self.attn(self.norm1(x_BTD), positions_T)
        return x_BTD + self.mlp(self.norm2(x_BTD))


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
            self.unembed = nnx.Linear(
                cfg.d_model,
                vocab_size,
                use_bias=False,
                dtype=dtype,
                kernel_init=nnx.initializers.normal(cfg.d_model**-0.5),
                rngs=rngs,
            )

    def features(self, tokens_BT: Array) -> Array:
        return self.features_from_embeddings(self.embed(tokens_BT))

    def features_from_embeddings(self, x_BTD: Array) -> Array:
        positions_T = jnp.arange(x_BTD.shape[1])
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
        return jnp.einsum("btd,dv->btv", h_BTD, w_DV)

    def __call__(self, tokens_BT: Array) -> Array:
        return self.logits(self.features(tokens_BT))
