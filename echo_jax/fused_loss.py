"""The echo loss from features and the output matrix, in chunks, never building [B, T, V].

`fused_echo_loss(h, w, batch, chunk_size=...)` equals `echo_loss(h @ w, ...)` (the
plain path) in value and gradients, looping over chunks of `chunk_size` target tokens so that
the largest temporary is one [chunk, V] block (plus dw, the size of w):

- without old log-probs the loss is linear in the per-target log-probs, so their cotangent g is
  known before the logits are: one pass computes each chunk's logits, its log-probs and its
  share of dh and dw (3 matmuls a chunk, the plain path's count) under a `jax.custom_vjp`;
- with them (PPO clip), `chunked_label_logprobs` saves only each target's logsumexp in the
  forward pass and recomputes each chunk's logits in the backward pass (4 matmuls a chunk).

Only the targets the loss or its metrics read (`loss.counted_targets`: ACTION, ENV_OUTPUT and,
under world_loss_target="all", WARNING) are projected: they are gathered to the front and the
loop stops after their last chunk, so CONTEXT and PAD targets (a third of the shipped corpus)
cost no matmul at all. Their log-probs come back as 0 and their gradients are exactly 0, as in
the plain path, where every term that reads them is multiplied by 0.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from echo_jax.loss import counted_targets, echo_loss_from_logprobs
from echo_jax.matmul import transposed


def resolve_impl(impl: str) -> str:
    """The loss path LossConfig.impl="auto" stands for here: "chunked" on a CPU, where skipping
    the uncounted targets' logits outweighs the loop, "plain" on accelerators (one big matmul
    and fused kernels; benchmarks/gpu_throughput)."""
    if impl != "auto":
        return impl
    return "chunked" if jax.default_backend() == "cpu" else "plain"


class _Chunks(NamedTuple):
    """The flattened targets in [K, chunk] blocks, zero-padded; with a mask, counted ones first."""

    h_KCD: Array
    labels_KC: Array
    order_N: Array | None  # Row of each sorted target in the flattened [B·S]; None: unsorted.
    counted_KC: Array | None  # Which sorted targets count (the last live block may mix).
    live: Array | int  # Blocks holding counted targets: the loops stop there.
    n: int  # B·S.

    def keep(self, x_KC: Array) -> Array:
        """x where the target counts, else 0."""
        return x_KC if self.counted_KC is None else jnp.where(self.counted_KC, x_KC, 0)

    def split(self, x_BS: Array) -> Array:
        """A per-target [B, S] array in the same blocks (zero-padded)."""
        x_N = x_BS.reshape(self.n)
        if self.order_N is not None:
            x_N = x_N[self.order_N]
        k, c = self.labels_KC.shape
        return jnp.pad(x_N, (0, k * c - self.n)).reshape(k, c)

    def merge(self, x_KC: Array, shape: tuple[int, ...]) -> Array:
        """Back from blocks to the targets' own order, [B, S] (or [B, S, D])."""
        x_N = x_KC.reshape(-1, *x_KC.shape[2:])[: self.n]
        if self.order_N is not None:
            x_N = jnp.zeros_like(x_N).at[self.order_N].set(x_N, unique_indices=True)
        return x_N.reshape(shape)


def _chunks(h_BSD: Array, labels_BS: Array, counted_BS: Array | None, chunk: int) -> _Chunks:
    b, s, d = h_BSD.shape
    n = b * s
    k = -(-n // chunk)
    h_ND, labels_N = h_BSD.reshape(n, d), labels_BS.reshape(n)
    pad = k * chunk - n
    order_N, counted_KC, live = None, None, k
    if counted_BS is not None:
        counted_N = counted_BS.reshape(n)
        order_N = jnp.argsort(jnp.logical_not(counted_N), stable=True)
        h_ND, labels_N = h_ND[order_N], labels_N[order_N]
        counted_KC = jnp.pad(counted_N[order_N], (0, pad)).reshape(k, chunk)
        live = (jnp.sum(counted_N, dtype=jnp.int32) + chunk - 1) // chunk
    h_KCD = jnp.pad(h_ND, ((0, pad), (0, 0))).reshape(k, chunk, d)
    labels_KC = jnp.pad(labels_N, (0, pad)).reshape(k, chunk)
    return _Chunks(h_KCD, labels_KC, order_N, counted_KC, live, n)


def _chunk_logits(h_CD: Array, w_DV: Array) -> Array:
    # The plain path's einsum in the compute dtype, then float32 (identical in float32).
    return jnp.einsum("cd,dv->cv", h_CD, w_DV.astype(h_CD.dtype)).astype(jnp.float32)


def _chunk_logprobs(h_CD: Array, w_DV: Array, labels_C: Array) -> tuple[Array, Array, Array]:
    """A chunk's logits [C, V], their logsumexp and the labels' log-probs [C]."""
    logits_CV = _chunk_logits(h_CD, w_DV)
    lse_C = jax.nn.logsumexp(logits_CV, axis=-1)
    label_C = jnp.take_along_axis(logits_CV, labels_C[:, None], axis=-1)[:, 0]
    return logits_CV, lse_C, label_C - lse_C


def _chunk_grads(h_CD: Array, w_DV: Array, dlogits_CV: Array, dw_DV: Array) -> tuple[Array, Array]:
    """The chunk's dh [C, D], and dw [D, V] with its share added (h transposed first: see
    echo_jax.matmul)."""
    dh_CD = jnp.einsum("cv,dv->cd", dlogits_CV, w_DV.astype(jnp.float32))
    return dh_CD, dw_DV + transposed(h_CD.astype(jnp.float32)) @ dlogits_CV


def _dlogits(logits_CV: Array, lse_C: Array, labels_C: Array, g_C: Array) -> Array:
    """d(g · log softmax(logits)[label]) / d logits = g · (onehot - softmax)."""
    onehot_CV = labels_C[:, None] == jnp.arange(logits_CV.shape[1])[None, :]
    return g_C[:, None] * (onehot_CV.astype(jnp.float32) - jnp.exp(logits_CV - lse_C[:, None]))


def _forward(h_BSD, w_DV, labels_BS, counted_BS, chunk) -> tuple[Array, Array]:
    c = _chunks(h_BSD, labels_BS, counted_BS, chunk)

    def one(i, carry):
        logp_KC, lse_KC = carry
        _, lse_C, logp_C = _chunk_logprobs(c.h_KCD[i], w_DV, c.labels_KC[i])
        return logp_KC.at[i].set(logp_C), lse_KC.at[i].set(lse_C)

    zeros_KC = jnp.zeros(c.labels_KC.shape, jnp.float32)
    logp_KC, lse_KC = jax.lax.fori_loop(0, c.live, one, (zeros_KC, zeros_KC))
    return c.merge(c.keep(logp_KC), labels_BS.shape), c.merge(c.keep(lse_KC), labels_BS.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def chunked_label_logprobs(
    h_BSD: Array, w_DV: Array, labels_BS: Array, counted_BS: Array | None, chunk: int
) -> Array:
    """float32 [B, S]: log softmax(h @ w)[labels], computed `chunk` target tokens at a time.

    For next-token targets pass h = features[:, :-1] and labels = tokens[:, 1:]. With a boolean
    `counted_BS`, only those targets are computed; the others are 0 with a zero gradient.
    """
    return _forward(h_BSD, w_DV, labels_BS, counted_BS, chunk)[0]


def _fwd(h_BSD, w_DV, labels_BS, counted_BS, chunk):
    logp_BS, lse_BS = _forward(h_BSD, w_DV, labels_BS, counted_BS, chunk)
    return logp_BS, (h_BSD, w_DV, labels_BS, counted_BS, lse_BS)


def _bwd(chunk, residuals, g_BS):
    h_BSD, w_DV, labels_BS, counted_BS, lse_BS = residuals
    c = _chunks(h_BSD, labels_BS, counted_BS, chunk)
    lse_KC, g_KC = c.split(lse_BS), c.keep(c.split(g_BS.astype(jnp.float32)))

    def one(i, carry):
        dw_DV, dh_KCD = carry
        h_CD = c.h_KCD[i]
        dlogits_CV = _dlogits(_chunk_logits(h_CD, w_DV), lse_KC[i], c.labels_KC[i], g_KC[i])
        dh_CD, dw_DV = _chunk_grads(h_CD, w_DV, dlogits_CV, dw_DV)
        return dw_DV, dh_KCD.at[i].set(dh_CD)

    init = (jnp.zeros(w_DV.shape, jnp.float32), jnp.zeros(c.h_KCD.shape, jnp.float32))
    dw_DV, dh_KCD = jax.lax.fori_loop(0, c.live, one, init)
    dh_BSD = c.merge(dh_KCD, h_BSD.shape)
    return dh_BSD.astype(h_BSD.dtype), dw_DV.astype(w_DV.dtype), None, None


chunked_label_logprobs.defvjp(_fwd, _bwd)


def _one_pass(h_BSD, w_DV, labels_BS, counted_BS, g_BS, chunk):
    """logp and the gradient of sum(g · logp) w.r.t. h and w, in one pass over the chunks."""
    c = _chunks(h_BSD, labels_BS, counted_BS, chunk)
    g_KC = c.keep(c.split(g_BS.astype(jnp.float32)))

    def one(i, carry):
        dw_DV, logp_KC, dh_KCD = carry
        h_CD, labels_C = c.h_KCD[i], c.labels_KC[i]
        logits_CV, lse_C, logp_C = _chunk_logprobs(h_CD, w_DV, labels_C)
        dlogits_CV = _dlogits(logits_CV, lse_C, labels_C, g_KC[i])
        dh_CD, dw_DV = _chunk_grads(h_CD, w_DV, dlogits_CV, dw_DV)
        return dw_DV, logp_KC.at[i].set(logp_C), dh_KCD.at[i].set(dh_CD)

    init = (
        jnp.zeros(w_DV.shape, jnp.float32),
        jnp.zeros(c.labels_KC.shape, jnp.float32),
        jnp.zeros(c.h_KCD.shape, jnp.float32),
    )
    dw_DV, logp_KC, dh_KCD = jax.lax.fori_loop(0, c.live, one, init)
    logp_BS = c.merge(c.keep(logp_KC), labels_BS.shape)
    dh_BSD = c.merge(dh_KCD, h_BSD.shape).astype(h_BSD.dtype)
    return logp_BS, dh_BSD, dw_DV.astype(w_DV.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _weighted_logprob_sum(h_BSD, w_DV, labels_BS, counted_BS, g_BS, chunk):
    logp_BS, _, _ = _one_pass(h_BSD, w_DV, labels_BS, counted_BS, g_BS, chunk)
    return (g_BS * logp_BS).sum(), logp_BS


def _wsum_fwd(h_BSD, w_DV, labels_BS, counted_BS, g_BS, chunk):
    logp_BS, dh_BSD, dw_DV = _one_pass(h_BSD, w_DV, labels_BS, counted_BS, g_BS, chunk)
    return ((g_BS * logp_BS).sum(), logp_BS), (dh_BSD, dw_DV)


def _wsum_bwd(chunk, residuals, cotangents):
    dh_BSD, dw_DV = residuals
    ct_sum, _ = cotangents  # logp leaves only through stop_gradient: its cotangent is zero.
    return ct_sum * dh_BSD, ct_sum * dw_DV, None, None, None


_weighted_logprob_sum.defvjp(_wsum_fwd, _wsum_bwd)


def fused_echo_loss(
    h_BTD: Array,
    w_DV: Array,
    batch: dict[str, Array],
    *,
    chunk_size: int,
    world_loss_target: str = "env_only",
    **loss_kwargs,
):
    """`echo_loss(h @ w, ...)` for features h [B, T, D] and the output matrix w [D, V], with
    the projection fused into the cross-entropy: the same loss, never [B, T, V], and no logits
    for the targets nothing reads.

    Without old log-probs the loss is linear in the log-probs, L = sum(g · logp) + c, with
    g = dL/dlogp fixed by the roles and advantages alone: then one pass over the chunks yields
    the log-probs and the gradient (3 matmuls per chunk, as the plain path). With them (PPO
    clip) g depends on logp, and the two-pass `chunked_label_logprobs` recomputes the logits.
    """
    tokens_BT = batch["tokens"]
    h_BSD, labels_BS, target_roles_BS = h_BTD[:, :-1], tokens_BT[:, 1:], batch["roles"][:, 1:]
    counted_BS = counted_targets(target_roles_BS, world_loss_target)
    old_logp_BS = loss_kwargs.pop("old_logp_BT", None)

    def from_logprobs(logp_BS):
        return echo_loss_from_logprobs(
            logp_BS,
            target_roles_BS,
            batch["advantage"],
            world_loss_target=world_loss_target,
            old_logp_BS=old_logp_BS,
            **loss_kwargs,
        )

    if old_logp_BS is not None:
        logp_BS = chunked_label_logprobs(h_BSD, w_DV, labels_BS, counted_BS, chunk_size)
        return from_logprobs(logp_BS)
    g_BS = jax.grad(lambda lp: from_logprobs(lp)[0])(jnp.zeros(labels_BS.shape, jnp.float32))
    g_BS = jax.lax.stop_gradient(g_BS)
    wsum, logp_BS = _weighted_logprob_sum(h_BSD, w_DV, labels_BS, counted_BS, g_BS, chunk_size)
    loss, metrics = from_logprobs(jax.lax.stop_gradient(logp_BS))
    loss = loss + (wsum - jax.lax.stop_gradient(wsum))  # Its value, with sum(g · logp)'s grad.
    return loss, dict(metrics, loss=loss)


def model_echo_loss(model, batch: dict[str, Array], *, chunk_size: int, **loss_kwargs):
    """`fused_echo_loss` through `Transformer.features` and `Transformer.output_matrix`."""
    h_BTD = model.features(batch["tokens"])
    return fused_echo_loss(
        h_BTD, model.output_matrix(), batch, chunk_size=chunk_size, **loss_kwargs
    )
