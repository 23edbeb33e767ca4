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
import jax.numpy as jnp
import numpy as np
from flax import nnx

from echo_jax.config import LossConfig, RLConfig
from echo_jax.data import roles
from echo_jax.objective.batch import Batch, batch_rows
from echo_jax.objective.fused_loss import chunked_label_logprobs, model_loss, resolve_impl
from echo_jax.objective.loss import label_logprobs, world_targets
from echo_jax.objective.objectives import objective_spec
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


def signal_rows(batch: RolloutBatch, lam: float, loss: LossConfig) -> np.ndarray:
    """bool [N]: the rows through which the loss has a gradient: an action target with a
    non-zero advantage (when the objective has a policy term), or an env target of non-zero
    weight (when it has an env term and λ does not zero it)."""
    objective = objective_spec(loss.objective)
    signal = np.zeros(batch.num_rows, bool)
    if objective.policy:
        has_action = (batch.roles[:, 1:] == roles.ACTION).any(axis=1)
        signal |= has_action & (batch.advantage != 0)
    if objective.env and not (objective.env_times_lam and lam == 0):
        targets = world_targets(batch.roles[:, 1:], loss.world_loss_target)
        signal |= (targets & (batch.env_weight > 0)).any(axis=1)
    return signal


UPDATE_METRICS = ("loss", "pg_loss", "env_loss", "clip_frac", "grad_norm")


def update(train_step, state, batch: RolloutBatch, lam: float, rl: RLConfig, loss: LossConfig,
           rng: np.random.Generator, dp: DataParallel):  # fmt: skip
    """`epochs` passes of minibatch PPO-clip updates; returns the state and mean metrics.
    Every process draws the same order from `rng` and supplies its block of each minibatch.

    Under rl.skip_empty_updates a minibatch with no row of `signal_rows` makes no step: its
    gradient is 0, but AdamW's momentum and weight decay would still move the parameters (a
    grpo run would drift on all-fail groups that carry no reward signal)."""
    b, n = rl.minibatch_size, batch.num_rows
    share = distributed.process_slice(b, dp.batch)  # This process's rows of every minibatch.
    signal = signal_rows(batch, lam, loss)
    sums: dict[str, float] = {}
    steps = skipped = 0

    def read(metrics) -> None:  # Step N-1's metrics, read once step N is dispatched.
        host = {k: float(v) for k, v in distributed.to_host(metrics).items()}
        if host["nonfinite"]:
            raise FloatingPointError(
                f"non-finite loss or gradient in an RL update (loss={host['loss']}, "
                f"grad_norm={host['grad_norm']}); the update was not applied"
            )
        for k in UPDATE_METRICS:
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
            env_row_weight_N=batch.env_row_weight,
            lam=lam,
        )

    pending = None
    for _ in range(rl.epochs):
        order = rng.permutation(n)
        order = np.concatenate([order, np.full(padded_rows(n, b) - n, -1)])
        for lo in range(0, len(order), b):
            idx = order[lo : lo + b]
            if rl.skip_empty_updates and not signal[idx[idx >= 0]].any():
                skipped += 1
                continue
            mb = distributed.global_batch(rows(idx[share]), dp.batch, b)
            state, metrics = train_step(state, mb)
            if pending is not None:
                read(pending)
            pending = metrics
            steps += 1
    if pending is not None:
        read(pending)
    means = {k: sums[k] / steps if steps else math.nan for k in UPDATE_METRICS}
    return state, means | {"update_steps": steps, "skipped_steps": skipped}


def _dot(a, b) -> jax.Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@functools.lru_cache(maxsize=8)
def make_term_gradients_fn(graphdef: nnx.GraphDef, loss: LossConfig):
    """Jitted `(acc, params, batch) -> acc`: adds one batch's gradients of L_pg and L_env (λ
    aside), each times its denominator, and the denominators, to the running sums `acc`."""

    def add(acc, params, batch: Batch):
        def terms(p):
            _, m = model_loss(nnx.merge(graphdef, p), batch, loss)
            return (m["pg_loss"], m["env_loss"]), (m["pg_den"], m["env_den"])

        _, vjp, (pg_den, env_den) = jax.vjp(terms, params, has_aux=True)
        one, zero = jnp.ones((), jnp.float32), jnp.zeros((), jnp.float32)
        (g_pg,), (g_env,) = vjp((one, zero)), vjp((zero, one))
        g_pg_sum, g_env_sum, pg_den_sum, env_den_sum = acc
        return (
            jax.tree.map(lambda s, g: s + pg_den * g, g_pg_sum, g_pg),
            jax.tree.map(lambda s, g: s + env_den * g, g_env_sum, g_env),
            pg_den_sum + pg_den,
            env_den_sum + env_den,
        )

    def summary(acc):
        g_pg_sum, g_env_sum, pg_den, env_den = acc
        pg_pp, env_ee, pg_env = (
            _dot(g_pg_sum, g_pg_sum),
            _dot(g_env_sum, g_env_sum),
            _dot(g_pg_sum, g_env_sum),
        )
        norm_pg = jnp.sqrt(pg_pp) / jnp.where(pg_den > 0, pg_den, 1.0)
        norm_env = jnp.sqrt(env_ee) / jnp.where(env_den > 0, env_den, 1.0)
        cos = pg_env / jnp.sqrt(pg_pp * env_ee)  # NaN where either gradient is 0.
        return norm_pg, norm_env, cos

    return jax.jit(add, donate_argnums=0), jax.jit(summary)


def term_gradients(fns, params, batch: RolloutBatch, lam: float, loss: LossConfig,
                   size: int, dp: DataParallel) -> dict[str, float]:  # fmt: skip
    """How the two terms pull on the parameters over the iteration's rows: |∇L_pg|, |∇(λ·L_env)|
    as the objective weighs it, |∇L_env| and the cosine between the two gradients, at `params`
    (the sampling parameters). Rows go in batches of `size`; each batch's gradient is weighted
    by its share of the term's denominator, so the result is the gradient of the term over all
    rows at once, whatever the batching."""
    add, summary = fns
    n = batch.num_rows
    zeros = jax.tree.map(jnp.zeros_like, params)
    acc = (zeros, jax.tree.map(jnp.zeros_like, params), jnp.zeros(()), jnp.zeros(()))
    order = np.concatenate([np.arange(n), np.full(padded_rows(n, size) - n, -1)])
    share = distributed.process_slice(size, dp.batch)
    for lo in range(0, len(order), size):
        rows = batch_rows(order[lo : lo + size][share], batch.tokens, batch.roles,
                          batch.advantage, old_logp_NS=batch.sample_logp,
                          pg_weight_N=batch.pg_weight, env_weight_NS=batch.env_weight,
                          env_row_weight_N=batch.env_row_weight)  # fmt: skip
        acc = add(acc, params, distributed.global_batch(rows, dp.batch, size))
    norm_pg, norm_env, cos = (float(x) for x in distributed.to_host(summary(acc)))
    objective = objective_spec(loss.objective)
    env_scale = objective.env * (lam if objective.env_times_lam else 1.0)
    return {
        "grad_norm_pg": norm_pg,
        "grad_norm_env": env_scale * norm_env,
        "grad_norm_env_unscaled": norm_env,
        "grad_cos": cos,
    }


def approx_kl(old_logp_NS, new_logp_NS, roles_NT) -> float:
    """KL(sampling policy || updated policy) on the sampled tokens in the contexts they were
    sampled in (the rows), Schulman's k3 estimator."""
    mask = roles_NT[:, 1:] == roles.ACTION
    if not mask.any():
        return math.nan
    log_ratio = (new_logp_NS - old_logp_NS)[mask].astype(np.float64)
    return float(np.mean(np.expm1(log_ratio) - log_ratio))
