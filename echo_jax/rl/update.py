"""Scoring rows at given parameters and the PPO-clip update on them: the log-prob gap that
checks the update sees what the sampler saw, the minibatch update, and the KL it moved.

Both split every call's rows over the data-parallel devices of all processes: each process,
holding the whole iteration's rows, supplies its block of each call (`process_slice`) and
`global_batch` assembles the global arrays, so they are collectives every process runs alike.
"""

from __future__ import annotations

import functools
import math

import jax
import numpy as np
from flax import nnx

from echo_jax.config import RLConfig
from echo_jax.data import roles
from echo_jax.objective.batch import Batch, batch_rows
from echo_jax.objective.fused_loss import chunked_label_logprobs, resolve_impl
from echo_jax.objective.loss import label_logprobs
from echo_jax.rl.rows import RolloutBatch
from echo_jax.train import distributed
from echo_jax.train.sharding import DataParallel


@functools.lru_cache(maxsize=8)
def make_score_fn(graphdef: nnx.GraphDef, impl: str, chunk_size: int):
    """Jitted `(params, tokens_BT) -> logp_BS`, log-probs of every next token (S = T - 1)."""

    def score(params, tokens_BT):
        model = nnx.merge(graphdef, params)
        if resolve_impl(impl) == "chunked":
            h_BTD = model.features(tokens_BT)
            return chunked_label_logprobs(
                h_BTD[:, :-1], model.output_matrix(), tokens_BT[:, 1:], None, chunk_size
            )
        return label_logprobs(model(tokens_BT), tokens_BT)

    return jax.jit(score)


def padded_rows(n: int, batch: int) -> int:
    return max(batch, -(-n // batch) * batch)


def score_rows(score, params, tokens_NT: np.ndarray, batch: int, dp: DataParallel) -> np.ndarray:
    """logp [N, T-1] of every row, on every process, in calls of `batch` rows (the tail padded
    with PAD rows), each call's rows split over dp's devices."""
    n, t = tokens_NT.shape
    padded = np.zeros((padded_rows(n, batch), t), np.int32)
    padded[:n] = tokens_NT
    share = distributed.process_slice(batch, dp.batch)
    out = [score(params, distributed.global_batch(padded[i : i + batch][share], dp.batch, batch))
           for i in range(0, len(padded), batch)]  # fmt: skip
    return np.concatenate(distributed.to_host(out))[:n]  # Every call dispatched before one read.


def role_ce(logp_NS: np.ndarray, roles_NT: np.ndarray, role: int) -> float:
    mask = roles_NT[:, 1:] == role
    return float(-logp_NS[mask].mean()) if mask.any() else math.nan


def logp_gap(batch: RolloutBatch, logp_NS: np.ndarray) -> dict[str, float]:
    """Mean and max |recorded sampling log-prob - forward-pass log-prob| over every sampled
    token: 0 up to float rounding when the rows are what the sampler saw."""
    mask = batch.roles[:, 1:] == roles.ACTION
    if not mask.any():
        return {"logp_gap_mean": math.nan, "logp_gap_max": math.nan, "logp_gap_tokens": 0}
    gap = np.abs(logp_NS[mask].astype(np.float64) - batch.sample_logp[mask])
    return {
        "logp_gap_mean": float(gap.mean()),
        "logp_gap_max": float(gap.max()),
        "logp_gap_tokens": int(mask.sum()),
    }


def update(train_step, state, batch: RolloutBatch, lam: float, rl: RLConfig,
           rng: np.random.Generator, dp: DataParallel):  # fmt: skip
    """`epochs` passes of minibatch PPO-clip updates; returns the state and mean metrics.
    Every process draws the same order from `rng` and supplies its block of each minibatch."""
    b, n = rl.minibatch_size, batch.num_rows
    share = distributed.process_slice(b, dp.batch)  # This process's rows of every minibatch.
    sums: dict[str, float] = {}
    steps = 0

    def read(metrics) -> None:  # Step N-1's metrics, read once step N is dispatched.
        host = {k: float(v) for k, v in distributed.to_host(metrics).items()}
        if host["nonfinite"]:
            raise FloatingPointError(
                f"non-finite loss or gradient in an RL update (loss={host['loss']}, "
                f"grad_norm={host['grad_norm']}); the update was not applied"
            )
        for k in ("loss", "pg_loss", "env_loss", "clip_frac", "grad_norm"):
            sums[k] = sums.get(k, 0.0) + host[k]

    def rows(idx: np.ndarray) -> Batch:  # -1: an empty row padding the last minibatch.
        return batch_rows(
            idx,
            batch.tokens,
            batch.roles,
            batch.advantage,
            old_logp_NS=batch.sample_logp,
            pg_weight_N=batch.pg_weight,
            env_weight_NS=batch.env_weight,
            lam=lam,
        )

    pending = None
    for _ in range(rl.epochs):
        order = rng.permutation(n)
        order = np.concatenate([order, np.full(padded_rows(n, b) - n, -1)])
        for lo in range(0, len(order), b):
            mb = distributed.global_batch(rows(order[lo : lo + b][share]), dp.batch, b)
            state, metrics = train_step(state, mb)
            if pending is not None:
                read(pending)
            pending = metrics
            steps += 1
    read(pending)
    return state, {k: v / steps for k, v in sums.items()} | {"update_steps": steps}


def approx_kl(old_logp_NS, new_logp_NS, roles_NT) -> float:
    """KL(sampling policy || updated policy) on the sampled tokens in the contexts they were
    sampled in (the rows), Schulman's k3 estimator."""
    mask = roles_NT[:, 1:] == roles.ACTION
    if not mask.any():
        return math.nan
    log_ratio = (new_logp_NS - old_logp_NS)[mask].astype(np.float64)
    return float(np.mean(np.expm1(log_ratio) - log_ratio))
