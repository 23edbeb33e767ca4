"""The echo loss from features and the output matrix, in chunks, never building [B, T, V].

`fused_echo_loss(h, w, batch, cfg)` equals `echo_loss(h @ w, batch, cfg)` (the plain path) in
value and gradients, looping over chunks of `cfg.chunk_size` target tokens so that the largest
temporary is one [chunk, V] block (plus dw, the size of w):

- without old log-probs the loss is linear in the per-target log-probs, so their cotangent g is
  known before the logits are: one pass computes each chunk's logits, its log-probs and its
  share of dh and dw (3 matmuls a chunk, the plain path's count) under a `jax.custom_vjp`;
- with them (PPO clip), `chunked_label_logprobs` saves only each target's logsumexp in the
  forward pass and recomputes each chunk's logits in the backward pass (4 matmuls a chunk).

Only the targets the loss or its metrics read (`loss.counted_targets`: ACTION, ENV_OUTPUT and,
under world_loss_target="all", WARNING) are projected: they are gathered to the front and the
loop stops at the last of them (a partial last chunk runs in smaller pieces), so CONTEXT and
PAD targets cost no matmul at all (benchmarks/train_step_vs_torch measures what skipping them
saves: its torch_skip side against torch). Their log-probs come back as 0 and their gradients
are exactly 0, as in the plain path, where every term that reads them is multiplied by 0.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from echo_jax.config import LossConfig, pick
from echo_jax.model.matmul import transposed
from echo_jax.objective.batch import Batch
from echo_jax.objective.loss import counted_targets, echo_loss, echo_loss_from_logprobs


def resolve_impl(impl: str) -> str:
    """The loss path LossConfig.impl="auto" stands for here: "chunked" on a CPU, where skipping
    the uncounted targets' logits outweighs the loop, "plain" on accelerators (one big matmul
    and fused kernels; benchmarks/gpu_throughput)."""
    auto = "chunked" if jax.default_backend() == "cpu" else "plain"
    return pick("loss impl", impl, {"auto": auto, "plain": "plain", "chunked": "chunked"})


# The last, partial chunk is projected in pieces of chunk // TAIL_PIECES targets, so that
# it costs about what it holds rather than a whole chunk: on average 1/8 of a chunk is wasted
# instead of 1/2 (a partial last chunk is a large share of a small CPU batch's targets;
# benchmarks/train_step_vs_torch times the step it is part of).
TAIL_PIECES = 4


def _piece(chunk: int) -> int:
    return max(chunk // TAIL_PIECES, 1)


class _Chunks(NamedTuple):
    """The flattened targets, zero-padded; with a mask, the counted ones first."""

    h_ND: Array
    labels_N: Array
    order_N: Array | None  # Row of each sorted target in the flattened [B·S]; None: unsorted.
    counted_N: Array | None  # Which sorted targets count (the last piece may mix).
    live: Array | int  # Targets to project (all counted ones): the loops stop there.
    n: int  # B·S.
    chunk: int

    @property
    def piece(self) -> int:
        """The tail's step."""
        return _piece(self.chunk)

    def keep(self, x_N: Array) -> Array:
        """x where the target counts, else 0."""
        return x_N if self.counted_N is None else jnp.where(self.counted_N, x_N, 0)

    def split(self, x_BS: Array) -> Array:
        """A per-target [B, S] array in the same order, flat and zero-padded."""
        x_N = x_BS.reshape(self.n)
        if self.order_N is not None:
            x_N = x_N[self.order_N]
        return jnp.pad(x_N, (0, self.labels_N.shape[0] - self.n))

    def merge(self, x_N: Array, shape: tuple[int, ...]) -> Array:
        """Back to the targets' own order, [B, S] (or [B, S, D])."""
        x_N = x_N[: self.n]
        if self.order_N is not None:
            x_N = jnp.zeros_like(x_N).at[self.order_N].set(x_N, unique_indices=True)
        return x_N.reshape(shape)

    def loop(self, body, carry):
        """carry = body(start, size, carry) over the live targets: whole chunks, then the rest
        in pieces (sizes are static, starts traced)."""
        chunk, piece = self.chunk, self.piece
        full = self.live // chunk
        carry = jax.lax.fori_loop(0, full, lambda i, cr: body(i * chunk, chunk, cr), carry)
        tail = full * chunk
        pieces = (self.live - tail + piece - 1) // piece
        return jax.lax.fori_loop(0, pieces, lambda j, cr: body(tail + j * piece, piece, cr), carry)


def _chunks(h_BSD: Array, labels_BS: Array, counted_BS: Array | None, chunk: int) -> _Chunks:
    b, s, d = h_BSD.shape
    n = b * s
    chunk = max(min(chunk, n), 1)  # A chunk past the last target is one of all of them.
    # The loop reads at most a piece past the last target (a partial last piece): pad by one.
    pad = _piece(chunk)
    h_ND, labels_N = h_BSD.reshape(n, d), labels_BS.reshape(n)
    order_N, counted_N, live = None, None, n
    if counted_BS is not None:
        counted_N = counted_BS.reshape(n)
        order_N = jnp.argsort(jnp.logical_not(counted_N), stable=True)
        h_ND, labels_N = h_ND[order_N], labels_N[order_N]
        counted_N = jnp.pad(counted_N[order_N], (0, pad))
        live = jnp.sum(counted_BS, dtype=jnp.int32)
    h_ND = jnp.pad(h_ND, ((0, pad), (0, 0)))
    return _Chunks(h_ND, jnp.pad(labels_N, (0, pad)), order_N, counted_N, live, n, chunk)


def _take(x: Array, start, size: int) -> Array:
    return jax.lax.dynamic_slice_in_dim(x, start, size)


def _put(x: Array, start, update: Array) -> Array:
    return jax.lax.dynamic_update_slice_in_dim(x, update, start, axis=0)


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
    echo_jax.model.matmul)."""
    dh_CD = jnp.einsum("cv,dv->cd", dlogits_CV, w_DV.astype(jnp.float32))
    return dh_CD, dw_DV + transposed(h_CD.astype(jnp.float32)) @ dlogits_CV


def _dlogits(logits_CV: Array, lse_C: Array, labels_C: Array, g_C: Array) -> Array:
    """d(g · log softmax(logits)[label]) / d logits = g · (onehot - softmax)."""
    onehot_CV = labels_C[:, None] == jnp.arange(logits_CV.shape[1])[None, :]
    return g_C[:, None] * (onehot_CV.astype(jnp.float32) - jnp.exp(logits_CV - lse_C[:, None]))


def _forward(h_BSD, w_DV, labels_BS, counted_BS, chunk) -> tuple[Array, Array]:
    c = _chunks(h_BSD, labels_BS, counted_BS, chunk)

    def one(start, size, carry):
        logp_N, lse_N = carry
        _, lse_C, logp_C = _chunk_logprobs(
            _take(c.h_ND, start, size), w_DV, _take(c.labels_N, start, size)
        )
        return _put(logp_N, start, logp_C), _put(lse_N, start, lse_C)

    zeros_N = jnp.zeros(c.labels_N.shape, jnp.float32)
    logp_N, lse_N = c.loop(one, (zeros_N, zeros_N))
    return c.merge(c.keep(logp_N), labels_BS.shape), c.merge(c.keep(lse_N), labels_BS.shape)


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
    lse_N, g_N = c.split(lse_BS), c.keep(c.split(g_BS.astype(jnp.float32)))

    def one(start, size, carry):
        dw_DV, dh_ND = carry
        h_CD, labels_C = _take(c.h_ND, start, size), _take(c.labels_N, start, size)
        lse_C, g_C = _take(lse_N, start, size), _take(g_N, start, size)
        dlogits_CV = _dlogits(_chunk_logits(h_CD, w_DV), lse_C, labels_C, g_C)
        dh_CD, dw_DV = _chunk_grads(h_CD, w_DV, dlogits_CV, dw_DV)
        return dw_DV, _put(dh_ND, start, dh_CD)

    init = (jnp.zeros(w_DV.shape, jnp.float32), jnp.zeros(c.h_ND.shape, jnp.float32))
    dw_DV, dh_ND = c.loop(one, init)
    dh_BSD = c.merge(dh_ND, h_BSD.shape)
    return dh_BSD.astype(h_BSD.dtype), dw_DV.astype(w_DV.dtype), None, None


chunked_label_logprobs.defvjp(_fwd, _bwd)


def _one_pass(h_BSD, w_DV, labels_BS, counted_BS, g_BS, chunk):
    """logp and the gradient of sum(g · logp) w.r.t. h and w, in one pass over the chunks."""
    c = _chunks(h_BSD, labels_BS, counted_BS, chunk)
    g_N = c.keep(c.split(g_BS.astype(jnp.float32)))

    def one(start, size, carry):
        dw_DV, logp_N, dh_ND = carry
        h_CD, labels_C = _take(c.h_ND, start, size), _take(c.labels_N, start, size)
        logits_CV, lse_C, logp_C = _chunk_logprobs(h_CD, w_DV, labels_C)
        dlogits_CV = _dlogits(logits_CV, lse_C, labels_C, _take(g_N, start, size))
        dh_CD, dw_DV = _chunk_grads(h_CD, w_DV, dlogits_CV, dw_DV)
        return dw_DV, _put(logp_N, start, logp_C), _put(dh_ND, start, dh_CD)

    init = (
        jnp.zeros(w_DV.shape, jnp.float32),
        jnp.zeros(c.labels_N.shape, jnp.float32),
        jnp.zeros(c.h_ND.shape, jnp.float32),
    )
    dw_DV, logp_N, dh_ND = c.loop(one, init)
    logp_BS = c.merge(c.keep(logp_N), labels_BS.shape)
    dh_BSD = c.merge(dh_ND, h_BSD.shape).astype(h_BSD.dtype)
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


def fused_echo_loss(h_BTD: Array, w_DV: Array, batch: Batch, cfg: LossConfig):
    """`echo_loss(h @ w, batch, cfg)` for features h [B, T, D] and the output matrix w [D, V],
    with the projection fused into the cross-entropy: the same loss, never [B, T, V], and no
    logits for the targets nothing reads.

    Without old log-probs the loss is linear in the log-probs, L = sum(g · logp) + c, with
    g = dL/dlogp fixed by the roles and advantages alone: then one pass over the chunks yields
    the log-probs and the gradient (3 matmuls per chunk, as the plain path). With them (PPO
    clip) g depends on logp, and the two-pass `chunked_label_logprobs` recomputes the logits.
    """
    h_BSD, labels_BS = h_BTD[:, :-1], batch.tokens_BT[:, 1:]
    counted_BS = counted_targets(batch.roles_BT[:, 1:], cfg.world_loss_target)
    chunk = cfg.chunk_size

    if batch.old_logp_BS is not None:
        logp_BS = chunked_label_logprobs(h_BSD, w_DV, labels_BS, counted_BS, chunk)
        return echo_loss_from_logprobs(logp_BS, batch, cfg)

    def loss_of(logp_BS):
        return echo_loss_from_logprobs(logp_BS, batch, cfg)[0]

    g_BS = jax.lax.stop_gradient(jax.grad(loss_of)(jnp.zeros(labels_BS.shape, jnp.float32)))
    wsum, logp_BS = _weighted_logprob_sum(h_BSD, w_DV, labels_BS, counted_BS, g_BS, chunk)
    loss, metrics = echo_loss_from_logprobs(jax.lax.stop_gradient(logp_BS), batch, cfg)
    loss = loss + (wsum - jax.lax.stop_gradient(wsum))  # Its value, with sum(g · logp)'s grad.
    return loss, dict(metrics, loss=loss)


def model_echo_loss(model, batch: Batch, cfg: LossConfig):
    """`fused_echo_loss` through `Transformer.features` and `Transformer.output_matrix`."""
    return fused_echo_loss(model.features(batch.tokens_BT), model.output_matrix(), batch, cfg)


def model_loss(model, batch: Batch, cfg: LossConfig):
    """The model's loss on the batch by the path cfg.impl names (resolve_impl): the logits
    then `echo_loss`, or `model_echo_loss`'s chunks."""
    if resolve_impl(cfg.impl) == "chunked":
        return model_echo_loss(model, batch, cfg)
    return echo_loss(model(batch.tokens_BT), batch, cfg)
