"""Causal self-attention backends for `echo_jax.model.transformer`.

"xla" and "cudnn" are `jax.nn.dot_product_attention`'s implementations (cuDNN's fused kernel
needs a GPU and bfloat16/float16). "blocked" is the same math split into query blocks, each
attending only to the keys at or before its end: the score matrices above the diagonal are
never computed, so n blocks cost (n + 1) / 2n of the FLOPs and score memory of "xla". "auto"
picks it on a CPU, where skipping the masked half outweighs running more, smaller products:
`benchmarks/gpu_throughput.py --attention=xla` or `--attention=blocked` times a train step with
either (on any backend), and `benchmarks/train_step_vs_torch.py` the CPU step "auto" gives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from echo_jax.config import ModelConfig

# Query blocks of "blocked" attention: the last block's keys are all T of them, and the
# compute is (n + 1) / 2n of the full square (56% for 8); more blocks mean more, smaller dots.
ATTENTION_BLOCKS = 8


def resolve(cfg: ModelConfig) -> str:
    """The backend "auto" stands for here: cuDNN on a GPU in bfloat16, the blocked kernel on a
    CPU, else XLA's `jax.nn.dot_product_attention`."""
    if cfg.attention != "auto":
        return cfg.attention
    backend = jax.default_backend()
    if backend == "gpu" and cfg.dtype == "bfloat16":
        return "cudnn"
    return "blocked" if backend == "cpu" else "xla"


def blocked_causal(q_BTNH: Array, k_BTNH: Array, v_BTNH: Array, blocks: int) -> Array:
    """softmax(q k^T / sqrt(H) + causal mask) v, skipping the blocks above the diagonal.

    Scores and softmax in float32 (as `jax.nn.dot_product_attention` computes them).
    """
    t, h = q_BTNH.shape[1], q_BTNH.shape[-1]
    edges = np.linspace(0, t, min(blocks, t) + 1).round().astype(int)
    scale = np.float32(h**-0.5)
    # Heads-major once, so that every block's key prefix is a contiguous slice.
    q_BNTH, k_BNTH, v_BNTH = (x.transpose(0, 2, 1, 3) for x in (q_BTNH, k_BTNH, v_BTNH))
    outs = []
    for start, end in zip(edges[:-1], edges[1:], strict=True):
        s_BNQK = jnp.einsum(
            "bnqh,bnkh->bnqk",
            q_BNTH[:, :, start:end],
            k_BNTH[:, :, :end],
            preferred_element_type=jnp.float32,
        )
        causal_QK = np.arange(start, end)[:, None] >= np.arange(end)[None, :]
        s_BNQK = jnp.where(causal_QK, s_BNQK * scale, np.finfo(np.float32).min / 2)
        p_BNQK = jax.nn.softmax(s_BNQK, axis=-1).astype(v_BTNH.dtype)
        outs.append(jnp.einsum("bnqk,bnkh->bnqh", p_BNQK, v_BNTH[:, :, :end]))
    return jnp.concatenate(outs, axis=2).transpose(0, 2, 1, 3)


def causal_attention(q_BTNH: Array, k_BTNH: Array, v_BTNH: Array, impl: str) -> Array:
    """[B, T, N, H] queries, keys and values -> [B, T, N, H] through backend `impl`."""
    if impl == "blocked":
        return blocked_causal(q_BTNH, k_BTNH, v_BTNH, ATTENTION_BLOCKS)
    return jax.nn.dot_product_attention(q_BTNH, k_BTNH, v_BTNH, is_causal=True, implementation=impl)
