"""Sampling one token per row on the device: greedy, or the tempered softmax restricted to its
top-p nucleus, each row with its own key, temperature and top-p. Every pass over the vocabulary
is a single-operand reduction or elementwise, because on a CPU this runs once per generated
token inside `echo_jax.agent.decoding`'s loop and paired reductions (argmax), long cumulative
sums and Gumbel noise over the vocabulary cost more than the model's own step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array

from echo_jax.data.vocab import PAD_ID

NUCLEUS_BISECTIONS = 32  # Halvings of [0, max prob] that locate the top-p cut-off.


def nucleus_mask(scaled_BV: Array, top_p_B: Array) -> Array:
    """bool [B, V]: per row, the smallest set of most likely tokens of softmax(scaled_BV)
    holding at least top_p of the mass (ties at the cut-off stay in; at least the most likely
    token; everything when top_p >= 1).

    The cut-off probability is found by bisection -- {p >= c} must hold >= top_p of the mass --
    which costs a few passes over V instead of a sort.
    """
    top_p_B = jnp.broadcast_to(top_p_B, scaled_BV.shape[:1])

    def cut(_):
        probs_BV = jax.nn.softmax(scaled_BV, axis=-1)

        def halve(_, bounds):
            lo_B, hi_B = bounds
            mid_B = 0.5 * (lo_B + hi_B)
            mass_B = jnp.sum(jnp.where(probs_BV >= mid_B[:, None], probs_BV, 0.0), axis=-1)
            enough_B = mass_B >= top_p_B
            return jnp.where(enough_B, mid_B, lo_B), jnp.where(enough_B, hi_B, mid_B)

        max_B = probs_BV.max(axis=-1)
        lo_B, _ = jax.lax.fori_loop(
            0, NUCLEUS_BISECTIONS, halve, (jnp.zeros_like(max_B), max_B * (1 + 1e-6))
        )
        return (probs_BV >= jnp.minimum(lo_B, max_B)[:, None]) | (top_p_B >= 1.0)[:, None]

    # The bisection is most of a decoding step's work on a CPU: skipped when no row needs it.
    everything = jnp.ones(scaled_BV.shape, bool)
    return jax.lax.cond(jnp.any(top_p_B < 1.0), cut, lambda _: everything, None)


def first_argmax(x_BV: Array) -> Array:
    """int32 [B]: jnp.argmax's answer (the first maximum) through two single-operand
    reductions, which XLA's CPU backend runs several times faster than argmax's paired one."""
    iota_V = jnp.arange(x_BV.shape[-1], dtype=jnp.int32)
    top_B1 = jnp.max(x_BV, axis=-1, keepdims=True)
    return jnp.min(jnp.where(x_BV >= top_B1, iota_V, x_BV.shape[-1]), axis=-1)


SAMPLE_BLOCK = 128  # Vocabulary entries per block of `inverse_cdf_sample`'s two-level search.


def inverse_cdf_sample(weights_BV: Array, keys_B: Array) -> Array:
    """int32 [B]: one index per row drawn with probability proportional to weights_BV (>= 0, a
    positive entry per row) by inverting the cumulative sum at one uniform per row. Exact like
    Gumbel-max (`jax.random.categorical`), which costs a threefry block and two logs per
    vocabulary entry: most of a CPU decoding step.

    Two levels, because a cumulative sum over the whole vocabulary is slow on a CPU: the block
    holding u·total among the cumulative block sums, then the entry within that block. Rounding
    can neither pick a zero-weight entry (a strict increase of a cumulative sum marks a
    positive weight) nor run past a block's last positive entry (clamped to it).
    """
    b, v = weights_BV.shape
    k = SAMPLE_BLOCK
    w_BV = jnp.pad(weights_BV, ((0, 0), (0, -v % k)))
    w_BNK = w_BV.reshape(b, -1, k)
    sums_BN = w_BNK.sum(axis=-1)
    cdf_BN = jnp.cumsum(sums_BN, axis=-1)
    u_B = jax.vmap(lambda key: jax.random.uniform(key, (), jnp.float32))(keys_B) * cdf_BN[:, -1]
    block_B = jnp.minimum(jnp.sum(cdf_BN <= u_B[:, None], axis=-1), _last_positive(sums_BN))
    before_B = jnp.where(block_B > 0, jnp.take_along_axis(cdf_BN, block_B[:, None] - 1, 1)[:, 0], 0)
    w_BK = jnp.take_along_axis(w_BNK, block_B[:, None, None], axis=1)[:, 0]
    within_B = jnp.sum(jnp.cumsum(w_BK, axis=-1) <= (u_B - before_B)[:, None], axis=-1)
    return block_B * k + jnp.minimum(within_B, _last_positive(w_BK))


def _last_positive(x_BN: Array) -> Array:
    """int32 [B]: the index of each row's last positive entry."""
    return jnp.max(jnp.where(x_BN > 0, jnp.arange(x_BN.shape[-1], dtype=jnp.int32), 0), axis=-1)


def sample_tokens(
    logits_BV: Array, keys_B: Array, temperature_B: Array, top_p_B: Array
) -> tuple[Array, Array]:
    """(token [B], its log-prob under the distribution it was drawn from [B]), one key per row.

    Greedy (log-prob 0) where temperature <= 0. Otherwise softmax(logits / temperature)
    restricted to its top-p nucleus (`nucleus_mask`), drawn by `inverse_cdf_sample`. PAD is
    never chosen.
    """
    b = logits_BV.shape[0]
    temperature_B = jnp.broadcast_to(temperature_B, (b,))
    logits_BV = logits_BV.astype(jnp.float32)
    logits_BV = logits_BV.at[:, PAD_ID].set(-jnp.inf)
    greedy_B = first_argmax(logits_BV)
    scaled_BV = logits_BV / jnp.maximum(temperature_B, 1e-6)[:, None]
    filtered_BV = jnp.where(nucleus_mask(scaled_BV, top_p_B), scaled_BV, -jnp.inf)
    shifted_BV = filtered_BV - jnp.max(filtered_BV, axis=-1, keepdims=True)
    weights_BV = jnp.exp(shifted_BV)
    sampled_B = inverse_cdf_sample(weights_BV, keys_B)
    logp_B = jnp.take_along_axis(shifted_BV, sampled_B[:, None], axis=-1)[:, 0] - jnp.log(
        weights_BV.sum(axis=-1)
    )  # log_softmax's own arithmetic, at the sampled token only.
    is_greedy_B = temperature_B <= 0
    return jnp.where(is_greedy_B, greedy_B, sampled_B), jnp.where(is_greedy_B, 0.0, logp_B)
