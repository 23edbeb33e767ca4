"""Times the train step and the KV-cache decode of a Qwen3-0.6B-shaped random model (no
weights needed: echo_jax.model.hf with Qwen3-0.6B's config.json numbers).

    python -m benchmarks.hf_model_step                       # CPU, small batch
    python -m benchmarks.hf_model_step --dtype=bfloat16 --batch=8 --seq=2048 --peak_tflops=989

Train step: `trainer.make_train_step` (AdamW, ECHO loss, the chunked loss head on a CPU) on
B rows of T tokens with a realistic role mix. Decode: one `extend` of one token for each of
B cache rows of `--cache` positions (the rollout engine's per-token work, sampling excluded).
MFU is model FLOPs (6·N·tokens for the step, 2·N per decoded token, N the parameters without
the embedding lookup, plus attention) over --peak_tflops, when given. One JSON line goes to
benchmarks/results/hf_model_step.jsonl with the machine.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from benchmarks.common import append_result, machine_info, peak_rss_mb, synthetic_targets
from echo_jax.config import LossConfig
from echo_jax.model.hf import HFDecoder
from echo_jax.model.hf_config import parse_config
from echo_jax.objective.batch import Batch
from echo_jax.train.trainer import init_state, make_train_step

# Qwen/Qwen3-0.6B's config.json (the fields this code reads).
QWEN3_0_6B = {
    "model_type": "qwen3",
    "vocab_size": 151936,
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}

_BATCH = flags.DEFINE_integer("batch", 1, "Rows per train step and decode call (B).")
_SEQ = flags.DEFINE_integer("seq", 256, "Tokens per train row (T).")
_CACHE = flags.DEFINE_integer("cache", 1024, "Cache positions per decode row.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_LAYERS = flags.DEFINE_integer("layers", 28, "Decoder blocks (28: Qwen3-0.6B's).")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed train steps (after one warm-up).")
_DECODES = flags.DEFINE_integer("decodes", 8, "Timed decode calls (after one warm-up).")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "The device's peak TFLOP/s for MFU (0: none).")


def model_flops_per_token(cfg, t: int) -> tuple[float, float]:
    """(train FLOPs per token, decode FLOPs per token at context t): 6N and 2N for the
    matmuls (N without the embedding lookup; the tied output projection counted) plus causal
    attention's scores and values."""
    d, f, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    qo = 2 * d * cfg.num_attention_heads * cfg.head_dim
    kv = 2 * d * cfg.num_key_value_heads * cfg.head_dim
    n = layers * (qo + kv + 3 * d * f) + d * cfg.vocab_size
    attn = 2 * 2 * layers * cfg.num_attention_heads * cfg.head_dim  # Per (query, key) pair.
    return 6 * n + 3 * attn * t / 2, 2 * n + attn * t


def main(argv):
    del argv
    raw = dict(QWEN3_0_6B, num_hidden_layers=_LAYERS.value)
    cfg = parse_config(raw, _DTYPE.value)
    b, t = _BATCH.value, _SEQ.value

    def make():
        return HFDecoder(cfg, "auto", rngs=nnx.Rngs(0))

    graphdef = nnx.split(nnx.eval_shape(make))[0]
    params = jax.jit(lambda: nnx.to_pure_dict(nnx.split(make())[1]))()
    n_params = sum(x.size for x in jax.tree.leaves(params))
    tx = optax.adamw(1e-5)
    state = init_state(params, tx)
    rng = np.random.default_rng(0)
    roles_BT, advantages_B = synthetic_targets(b, t)
    batch = Batch(
        tokens_BT=jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32),
        roles_BT=jnp.asarray(roles_BT),
        advantages_B=jnp.asarray(advantages_B),
    )
    step = make_train_step(graphdef, tx, LossConfig(objective="echo"))
    state, m = step(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(_STEPS.value):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    params = state.params
    del state

    extend = jax.jit(lambda p, *a: nnx.merge(graphdef, p).extend(*a), donate_argnums=(4,))
    cache = nnx.merge(graphdef, params).empty_cache(b, _CACHE.value)
    pos = jnp.full((b,), _CACHE.value // 2, jnp.int32)
    tok = jnp.zeros((b, 1), jnp.int32)
    one = jnp.ones((b,), jnp.int32)
    logits, cache = extend(params, tok, pos, one, cache)
    jax.block_until_ready(logits)
    dtimes = []
    for i in range(_DECODES.value):
        t0 = time.perf_counter()
        logits, cache = extend(params, tok, pos + i + 1, one, cache)
        jax.block_until_ready(logits)
        dtimes.append(time.perf_counter() - t0)
    decode_s = statistics.median(dtimes)

    train_fpt, decode_fpt = model_flops_per_token(cfg, t)
    _, decode_fpt = model_flops_per_token(cfg, _CACHE.value // 2)
    peak = _PEAK.value * 1e12
    record = {
        "benchmark": "hf_model_step",
        "model": f"qwen3-0.6b-shaped ({cfg.num_hidden_layers} layers, random)",
        "params": int(n_params),
        "dtype": cfg.dtype,
        "batch": b,
        "seq": t,
        "cache": _CACHE.value,
        "train_step_s": step_s,
        "train_tokens_per_s": b * t / step_s,
        "train_mfu": (b * t * train_fpt / step_s / peak) if peak else None,
        "decode_call_s": decode_s,
        "decode_tokens_per_s": b / decode_s,
        "decode_mfu": (b * decode_fpt / decode_s / peak) if peak else None,
        "peak_tflops": _PEAK.value or None,
        "peak_rss_mb": peak_rss_mb(),
        "backend": jax.default_backend(),
        "devices": [d.device_kind for d in jax.devices()],
        "machine": machine_info(),
    }
    print(record)
    print("wrote", append_result("hf_model_step", record))


if __name__ == "__main__":
    app.run(main)
