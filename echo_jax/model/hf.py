"""Qwen3- and Llama-architecture decoders in Flax NNX, with the tiny Transformer's interface.

The arithmetic follows `transformers`' Qwen3ForCausalLM / LlamaForCausalLM: RMSNorm in
float32 then scaled (Qwen3 also normalises each query and key head), rotary positions with
`rope_theta` (and Llama 3's frequency scaling), grouped-query attention, a SwiGLU MLP and a tied
or separate output projection. The modules are named as the checkpoint's tensors are
(`model.layers.3.self_attn.q_proj.weight` is `layers[3].self_attn.q_proj.kernel`, transposed),
so `echo_jax.model.hf_io` maps one onto the other by name.

Parameters are float32 (master weights for AdamW) and the compute is HFConfig.dtype. Rows are
left-aligned with PAD at the end, as for the tiny model: causal attention keeps padding from
reaching any real position. The methods the trainer, the loss and the rollout engine call
(`features`, `output_matrix`, `logits`, `__call__`, `empty_cache`, `extend`) are the
`echo_jax.model.interface.CausalLM` protocol.
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
from echo_jax.model.hf_config import HFConfig
from echo_jax.model.matmul import matmul
from echo_jax.model.transformer import KVCache, _rotate, _write

INIT_STD = 0.02  # transformers' initializer_range default, for randomly initialised models.


def inv_freq(cfg: HFConfig) -> np.ndarray:
    """float32 [H/2] rotary frequencies, with Llama 3's scaling when the config has it
    (transformers' `_compute_llama3_parameters`)."""
    h = cfg.head_dim
    freq = 1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, h, 2, dtype=np.float32) / h))
    freq = freq.astype(np.float32)
    if cfg.rope_scaling is None:
        return freq
    factor, low, high, old_len = cfg.rope_scaling
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * np.pi / freq
    scaled = np.where(wavelen > low_wavelen, freq / factor, freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def sin_cos(positions: Array, freq: tuple[float, ...]) -> tuple[Array, Array]:
    """sin and cos [..., H/2] at `positions` (static ones: tables built once while tracing)."""
    with jax.ensure_compile_time_eval():
        freq_H = jnp.asarray(np.asarray(freq, np.float32))
        angle = jnp.asarray(positions)[..., None].astype(jnp.float32) * freq_H
        return jnp.sin(angle), jnp.cos(angle)


class RMSNorm(nnx.Module):
    """x / rms(x) in float32, cast back, times a weight: transformers' Qwen3/Llama RMSNorm."""

    def __init__(self, dim: int, eps: float):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.weight[...] * x32.astype(x.dtype)).astype(x.dtype)


def _linear(d_in: int, d_out: int, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=False, dtype=dtype,
                      kernel_init=nnx.initializers.normal(INIT_STD), rngs=rngs)  # fmt: skip


def _rows(layer: nnx.Linear, x: Array) -> Array:
    """A projection on [..., D] as one 2-D product (a 3-D operand makes XLA CPU transpose its
    gradients; see transformer.Attention)."""
    return layer(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


class Attention(nnx.Module):
    def __init__(self, cfg: HFConfig, impl: str, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.impl, self.n_heads, self.kv_heads, self.head_dim = impl, n, k, h
        self.freq = tuple(inv_freq(cfg).tolist())  # Static (a tuple), not state.
        self.q_proj = _linear(d, n * h, dtype, rngs)
        self.k_proj = _linear(d, k * h, dtype, rngs)
        self.v_proj = _linear(d, k * h, dtype, rngs)
        self.o_proj = _linear(n * h, d, dtype, rngs)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(h, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm

    def _qkv(self, x_BTD: Array, sin: Array, cos: Array) -> tuple[Array, Array, Array]:
        b, t, _ = x_BTD.shape
        q_BTNH = _rows(self.q_proj, x_BTD).reshape(b, t, self.n_heads, self.head_dim)
        k_BTKH = _rows(self.k_proj, x_BTD).reshape(b, t, self.kv_heads, self.head_dim)
        v_BTKH = _rows(self.v_proj, x_BTD).reshape(b, t, self.kv_heads, self.head_dim)
        if self.qk_norm:
            q_BTNH, k_BTKH = self.q_norm(q_BTNH), self.k_norm(k_BTKH)
        return _rotate(q_BTNH, sin, cos), _rotate(k_BTKH, sin, cos), v_BTKH

    def __call__(self, x_BTD: Array, positions_T: np.ndarray) -> Array:
        b, t, d = x_BTD.shape
        sin_TH, cos_TH = sin_cos(positions_T, self.freq)
        q, k, v = self._qkv(x_BTD, sin_TH[None, :, None], cos_TH[None, :, None])
        if self.impl == "blocked" and self.kv_heads != self.n_heads:  # Its einsums need N heads.
            group = self.n_heads // self.kv_heads
            k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        y_BTNH = causal_attention(q, k, v, self.impl)
        return _rows(self.o_proj, y_BTNH.reshape(b, t, -1))

    def extend(self, x_RCD, rows_R, positions_RC, write_RC, cache):
        """`transformer.Attention.extend` with K <= N cached heads: cache [S, K, T, H]."""
        r, c, _ = x_RCD.shape
        sin_RCH, cos_RCH = sin_cos(positions_RC, self.freq)
        q_RCNH, k_RCKH, v_RCKH = self._qkv(x_RCD, sin_RCH[:, :, None], cos_RCH[:, :, None])
        cache_k_SKTH, cache_v_SKTH = cache
        t = cache_k_SKTH.shape[2]
        slots_RC = jnp.where(write_RC, positions_RC, t)  # Out of range: dropped.
        cache_k_SKTH = _write(cache_k_SKTH, rows_R, k_RCKH.transpose(0, 2, 1, 3), slots_RC)
        cache_v_SKTH = _write(cache_v_SKTH, rows_R, v_RCKH.transpose(0, 2, 1, 3), slots_RC)
        if rows_R is None:
            keys_RKTH, values_RKTH = cache_k_SKTH, cache_v_SKTH
        else:
            keys_RKTH, values_RKTH = cache_k_SKTH[rows_R], cache_v_SKTH[rows_R]
        g = self.n_heads // self.kv_heads
        q_RKGCH = q_RCNH.reshape(r, c, self.kv_heads, g, self.head_dim).transpose(0, 2, 3, 1, 4)
        q_RKGCH = q_RKGCH.astype(jnp.float32) * (self.head_dim**-0.5)
        scores = jnp.einsum("rkgch,rkth->rkgct", q_RKGCH, keys_RKTH.astype(jnp.float32))
        visible_RCT = jnp.arange(t)[None, None, :] <= positions_RC[:, :, None]
        scores = jnp.where(visible_RCT[:, None, None], scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1)
        y_RKGCH = jnp.einsum("rkgct,rkth->rkgch", probs, values_RKTH.astype(jnp.float32))
        y_RCX = y_RKGCH.transpose(0, 3, 1, 2, 4).reshape(r, c, -1).astype(x_RCD.dtype)
        return _rows(self.o_proj, y_RCX), (cache_k_SKTH, cache_v_SKTH)


class Mlp(nnx.Module):
    def __init__(self, cfg: HFConfig, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _linear(d, f, dtype, rngs)
        self.up_proj = _linear(d, f, dtype, rngs)
        self.down_proj = _linear(f, d, dtype, rngs)

    def __call__(self, x: Array) -> Array:
        return _rows(self.down_proj, jax.nn.silu(_rows(self.gate_proj, x)) * _rows(self.up_proj, x))


class Layer(nnx.Module):
    def __init__(self, cfg: HFConfig, impl: str, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, impl, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = Mlp(cfg, rngs)

    def __call__(self, x_BTD: Array, positions_T: np.ndarray) -> Array:
        x_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), positions_T)
        return x_BTD + self.mlp(self.post_attention_layernorm(x_BTD))

    def extend(self, x_RCD, rows_R, positions_RC, write_RC, cache):
        y_RCD, cache = self.self_attn.extend(
            self.input_layernorm(x_RCD), rows_R, positions_RC, write_RC, cache
        )
        x_RCD = x_RCD + y_RCD
        return x_RCD + self.mlp(self.post_attention_layernorm(x_RCD)), cache


class HFDecoder(nnx.Module):
    """tokens [B, T] -> logits [B, T, V] of a Qwen3 or Llama checkpoint's architecture."""

    def __init__(self, cfg: HFConfig, attention: str = "auto", *, rngs: nnx.Rngs):
        impl = resolve_attention(ModelConfig(dtype=cfg.dtype, attention=attention))
        self.dtype = jnp.dtype(cfg.dtype)
        self.tie_embeddings = cfg.tie_word_embeddings
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype,
                                      embedding_init=nnx.initializers.normal(INIT_STD),
                                      rngs=rngs)  # fmt: skip
        self.layers = nnx.List([Layer(cfg, impl, rngs) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size, self.dtype, rngs)

    def features(self, tokens_BT: Array) -> Array:
        x_BTD = self.embed_tokens(tokens_BT)
        positions_T = np.arange(x_BTD.shape[1])  # Static: tables built once.
        for layer in self.layers:
            x_BTD = layer(x_BTD, positions_T)
        return self.norm(x_BTD)

    def output_matrix(self) -> Array:
        """[D, V] projection from features to logits."""
        if self.tie_embeddings:
            return self.embed_tokens.embedding[...].T
        return self.lm_head.kernel[...]

    def logits(self, h_BTD: Array) -> Array:
        w_DV = self.output_matrix().astype(h_BTD.dtype)
        b, t, d = h_BTD.shape
        return matmul(h_BTD.reshape(b * t, d), w_DV).reshape(b, t, -1)

    def __call__(self, tokens_BT: Array) -> Array:
        return self.logits(self.features(tokens_BT))

    def empty_cache(self, rows: int, max_len: int) -> KVCache:
        """Keys and values [rows, K, max_len, H] per layer, all zero."""
        attn = self.layers[0].self_attn
        shape = (rows, attn.kv_heads, max_len, attn.head_dim)
        return tuple((jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))
                     for _ in self.layers)  # fmt: skip

    def extend(self, tokens_RC, start_R, count_R, cache, rows_R=None):
        """`transformer.Transformer.extend`: appends count_R tokens to cache rows rows_R at
        positions start_R onwards -> (next-token logits [R, V], the cache)."""
        r, c = tokens_RC.shape
        positions_RC = start_R[:, None] + jnp.arange(c)[None, :]
        write_RC = jnp.arange(c)[None, :] < count_R[:, None]
        x_RCD = self.embed_tokens(tokens_RC)
        new_cache = []
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            x_RCD, layer_cache = layer.extend(x_RCD, rows_R, positions_RC, write_RC, layer_cache)
            new_cache.append(layer_cache)
        last_R = jnp.clip(count_R - 1, 0, c - 1)
        h_R1D = self.norm(x_RCD[jnp.arange(r), last_R][:, None])
        return self.logits(h_R1D)[:, 0], tuple(new_cache)
