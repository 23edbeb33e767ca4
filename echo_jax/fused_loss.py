"""The echo loss from features and the output matrix, in chunks, never building [B, T, V].

`fused_echo_loss(h, w, batch, chunk_size=...)` equals `echo_loss(h @ w, ...)` (the default
plain path) in value and gradients, looping over chunks of `chunk_size` target tokens so that
the largest temporary is one [chunk, V] block (plus dw, the size of w):

- without old log-probs the loss is linear in the per-target log-probs, so their cotangent g is
  known before the logits are: one pass computes each chunk's logits, its log-probs and its
  share of dh and dw (3 matmuls a chunk, the plain path's count) under a `jax.custom_vjp`;
- with them (PPO clip), `chunked_label_logprobs` saves only each target's logsumexp in the
  forward pass and recomputes each chunk's logits in the backward pass (4 matmuls a chunk).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import Array

from echo_jax.loss import echo_loss_from_logprobs


def _chunks(h_BSD: Array, labels_BS: Array, chunk: int) -> tuple[Array, Array, int]:
    """[B, S, D] / [B, S] -> [K, chunk, D] / [K, chunk] over the flattened targets, zero-padded."""
    b, s, d = h_BSD.shape
    n = b * s
    k = -(-n // chunk)
    pad = k * chunk - n
    h_ND = jnp.pad(h_BSD.reshape(n, d), ((0, pad), (0, 0)))
    labels_N = jnp.pad(labels_BS.reshape(n), (0, pad))
    return h_ND.reshape(k, chunk, d), labels_N.reshape(k, chunk), n


def _chunk_logits(h_CD: Array, w_DV: Array) -> Array:
    # The plain path's einsum in the compute dtype, then float32 (identical in float32).
    return jnp.einsum("cd,dv->cv", h_CD, w_DV.astype(h_CD.dtype)).astype(jnp.float32)


def _forward(h_BSD: Array, w_DV: Array, labels_BS: Array, chunk: int) -> tuple[Array, Array]:
    h_KCD, labels_KC, n = _chunks(h_BSD, labels_BS, chunk)

    def one(args):
        h_CD, labels_C = args
        logits_CV = _chunk_logits(h_CD, w_DV)
        lse_C = jax.nn.logsumexp(logits_CV, axis=-1)
        label_C = jnp.take_along_axis(logits_CV, labels_C[:, None], axis=-1)[:, 0]
        return label_C - lse_C, lse_C

    logp_KC, lse_KC = jax.lax.map(one, (h_KCD, labels_KC))
    b, s = labels_BS.shape
    return logp_KC.reshape(-1)[:n].reshape(b, s), lse_KC.reshape(-1)[:n].reshape(b, s)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def chunked_label_logprobs(h_BSD: Array, w_DV: Array, labels_BS: Array, chunk: int) -> Array:
    """float32 [B, S]: log softmax(h @ w)[labels], computed `chunk` target tokens at a time.

    For next-token targets pass h = features[:, :-1] and labels = tokens[:, 1:].
    """
    return _forward(h_BSD, w_DV, labels_BS, chunk)[0]


def _fwd(h_BSD, w_DV, labels_BS, chunk):
    logp_BS, lse_BS = _forward(h_BSD, w_DV, labels_BS, chunk)
    return logp_BS, (h_BSD, w_DV, labels_BS, lse_BS)


def _bwd(chunk, residuals, g_BS):
    h_BSD, w_DV, labels_BS, lse_BS = residuals
    h_KCD, labels_KC, n = _chunks(h_BSD, labels_BS, chunk)
    k = h_KCD.shape[0]
    pad = k * chunk - n
    lse_KC = jnp.pad(lse_BS.reshape(n), (0, pad)).reshape(k, chunk)
    g_KC = jnp.pad(g_BS.astype(jnp.float32).reshape(n), (0, pad)).reshape(k, chunk)
    v = w_DV.shape[1]

    def one(dw_DV, args):
        h_CD, labels_C, lse_C, g_C = args
        p_CV = jnp.exp(_chunk_logits(h_CD, w_DV) - lse_C[:, None])
        onehot_CV = labels_C[:, None] == jnp.arange(v)[None, :]
        dlogits_CV = g_C[:, None] * (onehot_CV.astype(jnp.float32) - p_CV)
        dh_CD = jnp.einsum("cv,dv->cd", dlogits_CV, w_DV.astype(jnp.float32))
        dw_DV = dw_DV + jnp.einsum("cd,cv->dv", h_CD.astype(jnp.float32), dlogits_CV)
        return dw_DV, dh_CD

    dw_DV, dh_KCD = jax.lax.scan(
        one, jnp.zeros(w_DV.shape, jnp.float32), (h_KCD, labels_KC, lse_KC, g_KC)
    )
    dh_BSD = dh_KCD.reshape(k * chunk, -1)[:n].reshape(h_BSD.shape)
    return dh_BSD.astype(h_BSD.dtype), dw_DV.astype(w_DV.dtype), None


chunked_label_logprobs.defvjp(_fwd, _bwd)


def _one_pass(h_BSD, w_DV, labels_BS, g_BS, chunk):
    """logp and the gradient of sum(g · logp) w.r.t. h and w, in one pass over the chunks."""
    h_KCD, labels_KC, n = _chunks(h_BSD, labels_BS, chunk)
    k = h_KCD.shape[0]
    g_KC = jnp.pad(g_BS.astype(jnp.float32).reshape(n), (0, k * chunk - n)).reshape(k, chunk)
    v = w_DV.shape[1]

    def one(dw_DV, args):
        h_CD, labels_C, g_C = args
        logits_CV = _chunk_logits(h_CD, w_DV)
        lse_C = jax.nn.logsumexp(logits_CV, axis=-1)
        label_C = jnp.take_along_axis(logits_CV, labels_C[:, None], axis=-1)[:, 0]
        onehot_CV = (labels_C[:, None] == jnp.arange(v)[None, :]).astype(jnp.float32)
        dlogits_CV = g_C[:, None] * (onehot_CV - jnp.exp(logits_CV - lse_C[:, None]))
        dh_CD = jnp.einsum("cv,dv->cd", dlogits_CV, w_DV.astype(jnp.float32))
        dw_DV = dw_DV + jnp.einsum("cd,cv->dv", h_CD.astype(jnp.float32), dlogits_CV)
        return dw_DV, (label_C - lse_C, dh_CD)

    dw_DV, (logp_KC, dh_KCD) = jax.lax.scan(
        one, jnp.zeros(w_DV.shape, jnp.float32), (h_KCD, labels_KC, g_KC)
    )
    b, s = labels_BS.shape
    logp_BS = logp_KC.reshape(-1)[:n].reshape(b, s)
    dh_BSD = dh_KCD.reshape(k * chunk, -1)[:n].reshape(h_BSD.shape).astype(h_BSD.dtype)
    return logp_BS, dh_BSD, dw_DV.astype(w_DV.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _weighted_logprob_sum(h_BSD, w_DV, labels_BS, g_BS, chunk):
    logp_BS, _, _ = _one_pass(h_BSD, w_DV, labels_BS, g_BS, chunk)
    return (g_BS * logp_BS).sum(), logp_BS


def _wsum_fwd(h_BSD, w_DV, labels_BS, g_BS, chunk):
    logp_BS, dh_BSD, dw_DV = _one_pass(h_BSD, w_DV, labels_BS, g_BS, chunk)
    return ((g_BS * logp_BS).sum(), logp_BS), (dh_BSD, dw_DV)


def _wsum_bwd(chunk, residuals, cotangents):
    dh_BSD, dw_DV = residuals
    ct_sum, _ = cotangents  # logp leaves only through stop_gradient: its cotangent is zero.
    return ct_sum * dh_BSD, ct_sum * dw_DV, None, None


_weighted_logprob_sum.defvjp(_wsum_fwd, _wsum_bwd)


def fused_echo_loss(
    h_BTD: Array, w_DV: Array, batch: dict[str, Array], *, chunk_size: int, **loss_kwargs
):
    """`echo_loss(h @ w, ...)` for features h [B, T, D] and the output matrix w [D, V], with
    the projection fused into the cross-entropy: the same loss, never [B, T, V].

    Without old log-probs the loss is linear in the log-probs, L = sum(g · logp) + c, with
    g = dL/dlogp fixed by the roles and advantages alone: then one pass over the chunks yields
    the log-probs and the gradient (3 matmuls per chunk, as the plain path). With them (PPO
    clip) g depends on logp, and the two-pass `chunked_label_logprobs` recomputes the logits.
    """
    tokens_BT = batch["tokens"]
    h_BSD, labels_BS = h_BTD[:, :-1], tokens_BT[:, 1:]
    old_logp_BS = loss_kwargs.pop("old_logp_BT", None)

    def from_logprobs(logp_BS):
        return echo_loss_from_logprobs(
            logp_BS, batch["roles"][:, 1:], batch["advantage"], old_logp_BS=old_logp_BS,
            **loss_kwargs,
        )  # fmt: skip

    if old_logp_BS is not None:
        return from_logprobs(chunked_label_logprobs(h_BSD, w_DV, labels_BS, chunk_size))
    g_BS = jax.grad(lambda lp: from_logprobs(lp)[0])(jnp.zeros(labels_BS.shape, jnp.float32))
    g_BS = jax.lax.stop_gradient(g_BS)
    wsum, logp_BS = _weighted_logprob_sum(h_BSD, w_DV, labels_BS, g_BS, chunk_size)
    loss, metrics = from_logprobs(jax.lax.stop_gradient(logp_BS))
    loss = loss + (wsum - jax.lax.stop_gradient(wsum))  # Its value, with sum(g · logp)'s grad.
    return loss, dict(metrics, loss=loss)


def model_echo_loss(model, batch: dict[str, Array], *, chunk_size: int, **loss_kwargs):
    """`fused_echo_loss` through `Transformer.features` and `Transformer.output_matrix`."""
    h_BTD = model.features(batch["tokens"])
    return fused_echo_loss(
        h_BTD, model.output_matrix(), batch, chunk_size=chunk_size, **loss_kwargs
    )
