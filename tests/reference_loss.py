"""An independent float64 numpy implementation of echo_loss's semantics, written row by row
from the specification, to check the vectorised JAX version against."""

from __future__ import annotations

import numpy as np

PAD, CONTEXT, ACTION, ENV_OUTPUT, WARNING = range(5)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def reference_echo_loss(
    logits,
    tokens,
    roles,
    advantages,
    *,
    objective,
    lam,
    world_loss_target,
    world_loss_normalization,
    pg_loss_reduction,
    old_logp=None,
    clip_eps=0.2,
    env_weight=None,
) -> dict[str, float]:
    logits = np.asarray(logits, np.float64)
    batch, length, _ = logits.shape
    env_roles = {ENV_OUTPUT, WARNING} if world_loss_target == "all" else {ENV_OUTPUT}
    weights = np.ones(batch) if env_weight is None else np.asarray(env_weight, np.float64)

    row_pg, row_env = [], []
    pg_sum = pg_count = env_sum = env_count = action_ce_sum = 0.0
    for b in range(batch):
        lp = log_softmax(logits[b])
        pg_terms, env_terms, n_obs = [], [], 0
        for t in range(length - 1):
            target, role = tokens[b, t + 1], roles[b, t + 1]
            logp = lp[t, target]
            if role in (ENV_OUTPUT, WARNING):
                n_obs += 1
            if role == ACTION:
                adv = advantages[b]
                if old_logp is None:
                    term = -adv * logp
                else:
                    ratio = np.exp(logp - old_logp[b, t])
                    term = -min(ratio * adv, np.clip(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
                pg_terms.append(term)
                action_ce_sum += -logp
            if role in env_roles and weights[b] != 0:
                env_terms.append(-logp * weights[b])
        pg_sum += sum(pg_terms)
        pg_count += len(pg_terms)
        if pg_terms:
            row_pg.append(sum(pg_terms) / len(pg_terms))
        env_sum += sum(env_terms)
        env_count += len(env_terms) * (1 if weights[b] != 0 else 0)
        if n_obs > 0 and weights[b] != 0:
            row_env.append(sum(env_terms) / (n_obs + 1e-3))

    if pg_loss_reduction == "sequence_mean":
        pg = float(np.mean(row_pg)) if row_pg else 0.0
    else:
        pg = pg_sum / pg_count if pg_count else 0.0
    if world_loss_normalization == "full_observation_tokens":
        env = float(np.mean(row_env)) if row_env else 0.0
    else:
        env = env_sum / env_count if env_count else 0.0
    loss = {"grpo": pg, "echo": pg + lam * env, "verifier_free": env}[objective]
    return {
        "loss": loss,
        "pg_loss": pg,
        "env_loss": env,
        "env_ce": env_sum / env_count if env_count else 0.0,
        "action_ce": action_ce_sum / pg_count if pg_count else 0.0,
    }
