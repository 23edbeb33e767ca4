"""The attention backends agree: "blocked" is jax.nn.dot_product_attention's math, reordered."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from echo_jax.config import MODEL_PRESETS, ModelConfig
from echo_jax.model.attention import blocked_causal, causal_attention, resolve


@pytest.mark.parametrize("t, blocks", [(1, 8), (7, 3), (37, 8), (12, 12)])
def test_blocked_matches_xla_values_and_gradients(t, blocks):
    rng = np.random.default_rng(t)
    q, k, v = (jnp.asarray(rng.normal(size=(2, t, 3, 8)), jnp.float32) for _ in range(3))
    w = jnp.asarray(rng.normal(size=(2, t, 3, 8)), jnp.float32)

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v) * w).sum()

    xla = jax.value_and_grad(loss(lambda *a: causal_attention(*a, "xla")), argnums=(0, 1, 2))
    blk = jax.value_and_grad(loss(lambda *a: blocked_causal(*a, blocks)), argnums=(0, 1, 2))
    (want, want_g), (got, got_g) = jax.jit(xla)(q, k, v), jax.jit(blk)(q, k, v)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for g, wg in zip(got_g, want_g, strict=True):
        np.testing.assert_allclose(g, wg, rtol=1e-5, atol=1e-5)


def test_blocked_in_bfloat16_stays_close():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 40, 2, 8)), jnp.bfloat16) for _ in range(3))
    got = blocked_causal(q, k, v, 4)
    assert got.dtype == jnp.bfloat16
    want = causal_attention(q, k, v, "xla")
    np.testing.assert_allclose(np.float32(got), np.float32(want), atol=3e-2)


def test_auto_is_blocked_on_cpu_and_explicit_choices_stand():
    assert jax.default_backend() == "cpu"
    assert resolve(ModelConfig()) == "blocked"
    assert resolve(MODEL_PRESETS["gpu100m"]) == "blocked"  # cudnn only on a GPU.
    for impl in ("xla", "cudnn", "blocked"):
        assert resolve(dataclasses.replace(ModelConfig(), attention=impl)) == impl
