import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from echo_jax.config import ModelConfig
from echo_jax.model.transformer import Transformer, rotary, rotary_rows

CFG = ModelConfig(d_model=12, n_layers=2, n_heads=2, d_ff=20)
B, T, V = 3, 11, 13


@pytest.fixture(scope="module")
def model():
    return Transformer(CFG, V, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("tie", [True, False])
def test_logit_shape_and_dtype(tie):
    import dataclasses

    m = Transformer(dataclasses.replace(CFG, tie_embeddings=tie), V, rngs=nnx.Rngs(1))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, V, (B, T)), jnp.int32)
    logits = m(tokens)
    chex.assert_shape(logits, (B, T, V))
    chex.assert_type(logits, jnp.float32)
    chex.assert_tree_all_finite(logits)


def test_causality_through_gradients(model):
    """The output at position t has zero gradient w.r.t. every input after t, and a nonzero one
    w.r.t. every input up to t."""
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, V, (1, T)), jnp.int32)
    x_BTD = model.embed(tokens)

    for t in (0, 4, T - 1):

        def out_at_t(x, t=t):
            return model.logits(model.features_from_embeddings(x))[0, t].sum()

        grad_TD = jax.jit(jax.grad(out_at_t))(x_BTD)[0]
        per_position = np.abs(np.asarray(grad_TD)).sum(axis=-1)
        np.testing.assert_array_equal(per_position[t + 1 :], 0.0)
        assert (per_position[: t + 1] > 0).all(), per_position


def test_padding_after_the_end_does_not_change_earlier_logits(model):
    rng = np.random.default_rng(2)
    tokens = rng.integers(1, V, (B, T)).astype(np.int32)
    other = tokens.copy()
    other[:, 7:] = 0
    np.testing.assert_allclose(model(tokens)[:, :7], model(other)[:, :7], rtol=1e-5, atol=1e-6)


def test_bfloat16_compute():
    import dataclasses

    m = Transformer(dataclasses.replace(CFG, dtype="bfloat16"), V, rngs=nnx.Rngs(0))
    logits = m(jnp.zeros((B, T), jnp.int32))
    chex.assert_type(logits, jnp.bfloat16)
    chex.assert_tree_all_finite(logits.astype(jnp.float32))


def test_rotary_tables_from_static_positions_equal_traced_ones():
    """Static positions fold sin/cos into constants (transformer._sin_cos); traced ones, as
    in decoding, compute them in the graph: the two must agree."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 11, 3, 8)), jnp.float32)
    static = jax.jit(lambda x: rotary(x, np.arange(11)))(x)
    traced = jax.jit(rotary)(x, jnp.arange(11))
    rows = jax.jit(rotary_rows)(x, jnp.broadcast_to(jnp.arange(11), (2, 11)))
    np.testing.assert_allclose(static, traced, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rows, traced, rtol=1e-6, atol=1e-6)
