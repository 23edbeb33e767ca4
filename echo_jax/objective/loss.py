"""ECHO's objective: a policy-gradient term on ACTION targets plus λ · CE on ENV_OUTPUT targets.

Position t predicts token t+1, so every mask below is taken from the *target* token's role.
Each term is normalised over its own tokens, and empty masks give 0, never NaN. How the terms
combine is the objective's record (echo_jax.objective.objectives); the options come whole as
one LossConfig.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array

from echo_jax.config import LossConfig
from echo_jax.data import roles
from echo_jax.objective.batch import Batch
from echo_jax.objective.objectives import objective_spec
from echo_jax.util.choices import pick

# Added to each row's observation-token count in the paper's normalisation.
FULL_OBS_EPS = 1e-3


# Rows of [B·T, V] logits handled per loop step of label_logprobs on CPU (about 4 MiB of
# float32, cache-sized); accelerators take all rows in one step (one fused kernel each way).
_ROW_BLOCK_BYTES = 1 << 22


def _row_block(n_rows: int, v: int) -> int:
    """The largest divisor of n_rows whose block of rows fits _ROW_BLOCK_BYTES (at least 1)."""
    if jax.default_backend() != "cpu":
        return n_rows
    target = max(1, _ROW_BLOCK_BYTES // (4 * v))
    return max(d for d in range(1, min(n_rows, target) + 1) if n_rows % d == 0)


def _logprobs_and_lse(logits_BTV: Array, next_BT: Array) -> tuple[Array, Array]:
    b, t, v = logits_BTV.shape
    r = _row_block(b * t, v)

    def block(args):
        x_RV, next_R = args
        x_RV = x_RV.astype(jnp.float32)
        lse_R = jax.nn.logsumexp(x_RV, axis=-1)
        return jnp.take_along_axis(x_RV, next_R[:, None], axis=-1)[:, 0] - lse_R, lse_R

    logp_KR, lse_KR = jax.lax.map(block, (logits_BTV.reshape(-1, r, v), next_BT.reshape(-1, r)))
    return logp_KR.reshape(b, t), lse_KR.reshape(b, t)


@jax.custom_vjp
def _next_token_logprobs(logits_BTV: Array, next_BT: Array) -> Array:
    return _logprobs_and_lse(logits_BTV, next_BT)[0]


def _next_token_logprobs_fwd(logits_BTV, next_BT):
    logp_BT, lse_BT = _logprobs_and_lse(logits_BTV, next_BT)
    return logp_BT, (logits_BTV, next_BT, lse_BT)


def _next_token_logprobs_bwd(residuals, g_BT):
    """d logits = g · (onehot - softmax), written block by block over the logits' own buffer."""
    logits_BTV, next_BT, lse_BT = residuals
    b, t, v = logits_BTV.shape
    r = _row_block(b * t, v)
    k = b * t // r
    next_KR, lse_KR = next_BT.reshape(k, r), lse_BT.reshape(k, r)
    g_KR = g_BT.astype(jnp.float32).reshape(k, r)

    def block(i, buf_KRV):
        p_RV = jnp.exp(buf_KRV[i].astype(jnp.float32) - lse_KR[i][:, None])
        onehot_RV = (next_KR[i][:, None] == jnp.arange(v)).astype(jnp.float32)
        return buf_KRV.at[i].set((g_KR[i][:, None] * (onehot_RV - p_RV)).astype(buf_KRV.dtype))

    grad_KRV = jax.lax.fori_loop(0, k, block, logits_BTV.reshape(k, r, v))
    return grad_KRV.reshape(b, t, v), None


_next_token_logprobs.defvjp(_next_token_logprobs_fwd, _next_token_logprobs_bwd)


def label_logprobs(logits_BTV: Array, tokens_BT: Array) -> Array:
    """log p(tokens[:, t+1] | ...) as label logit - logsumexp; no [B, T, V] log-softmax.

    Blocks of rows at a time, forward and backward, so XLA keeps no [B, T, V] temporary and the
    gradient can take the logits' buffer (in place when the logits are donated or dead).
    """
    next_BT = jnp.pad(tokens_BT[:, 1:], ((0, 0), (0, 1)))  # The last position predicts nothing.
    return _next_token_logprobs(logits_BTV, next_BT)[:, :-1]


def world_targets(target_roles_BS: Array, world_loss_target: str = "env_only") -> Array:
    """bool: the env term's targets, ENV_OUTPUT (and WARNING under world_loss_target="all")."""
    with_warning = pick("world_loss_target", world_loss_target, {"env_only": False, "all": True})
    world_BS = target_roles_BS == roles.ENV_OUTPUT
    if with_warning:
        world_BS = world_BS | (target_roles_BS == roles.WARNING)
    return world_BS


def counted_targets(target_roles_BS: Array, world_loss_target: str = "env_only") -> Array:
    """bool: the targets whose log-probs the loss or its metrics read (ACTION and the env
    term's); every other one is multiplied by 0, so a fused path may skip its logits."""
    return (target_roles_BS == roles.ACTION) | world_targets(target_roles_BS, world_loss_target)


def _safe_div(num: Array, den: Array) -> Array:
    """num / den, and 0 where den is 0 (an empty term; den is a count or a sum of weights)."""
    return num / jnp.where(den > 0, den, 1.0)


def _pg_term(logp_BS: Array, action_BS: Array, batch: Batch, cfg: LossConfig):
    """The policy-gradient loss, its denominator, the share of action targets whose PPO ratio
    was clipped, and the number of action targets."""
    f32 = jnp.float32
    adv_B1 = batch.advantages_B.astype(f32)[:, None]
    if batch.old_logp_BS is None:
        pg_BS = -adv_B1 * logp_BS
        clipped_BS = jnp.zeros_like(logp_BS)
    else:
        ratio_BS = jnp.exp(logp_BS - batch.old_logp_BS.astype(f32))
        clipped_ratio_BS = jnp.clip(ratio_BS, 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps)
        pg_BS = -jnp.minimum(ratio_BS * adv_B1, clipped_ratio_BS * adv_B1)
        clipped_BS = (jnp.abs(ratio_BS - 1.0) > cfg.clip_eps).astype(f32)
    n_action_B = action_BS.sum(axis=1)
    pg_B = (pg_BS * action_BS).sum(axis=1)
    w_B = jnp.ones_like(n_action_B) if batch.pg_weight_B is None else batch.pg_weight_B.astype(f32)

    def sequence_mean():  # Each episode's mean over its action targets, then their mean.
        has_action_B = (n_action_B > 0).astype(f32) * w_B
        return (_safe_div(pg_B, n_action_B) * has_action_B).sum(), has_action_B.sum()

    def token_mean():  # One mean over every action target: each counts once, whatever its row.
        return pg_B.sum(), n_action_B.sum()

    reduce = pick(
        "pg_loss_reduction",
        cfg.pg_loss_reduction,
        {"sequence_mean": sequence_mean, "token_mean": token_mean},
    )
    n_action = n_action_B.sum()
    num, den = reduce()
    return _safe_div(num, den), den, _safe_div((clipped_BS * action_BS).sum(), n_action), n_action


def _env_rows(
    selected_ce_B: Array, n_selected: Array, observation_BS: Array, batch: Batch, cfg: LossConfig
) -> tuple[Array, Array]:
    """The env term as per-row numerators over one denominator: L_env = sum(rows_B) / den. A
    per-row λ then weighs each row's share without moving the denominator."""

    def full_observation_tokens():  # Each episode's CE over all its observation tokens, + eps.
        n_obs_B = observation_BS.sum(axis=1)
        has_obs_B = (n_obs_B > 0).astype(jnp.float32)
        if batch.env_weight_BS is not None:  # A row whose observations all weigh 0 is left out.
            kept_B = (batch.env_weight_BS.astype(jnp.float32) * observation_BS).sum(axis=1) > 0
            has_obs_B = has_obs_B * kept_B.astype(jnp.float32)
        if batch.env_row_weight_B is not None:  # An episode cut into rows counts once.
            has_obs_B = has_obs_B * batch.env_row_weight_B.astype(jnp.float32)
        return selected_ce_B / (n_obs_B + FULL_OBS_EPS) * has_obs_B, has_obs_B.sum()

    def token_mean():  # One mean over every selected target.
        return selected_ce_B, n_selected

    normalise = pick(
        "world_loss_normalization",
        cfg.world_loss_normalization,
        {"full_observation_tokens": full_observation_tokens, "token_mean": token_mean},
    )
    return normalise()


def echo_loss_from_logprobs(
    logp_BS: Array, batch: Batch, cfg: LossConfig
) -> tuple[Array, dict[str, Array]]:
    """The objective given per-target log-probs logp_BS (of batch.tokens_BT[:, 1:]); shared by
    the plain and the fused-vocab paths. Returns (loss, metrics).

    `batch.pg_weight_B` and `batch.env_row_weight_B` weigh each row in the per-episode means:
    an episode cut into several rows gives each its share of the episode's action (observation)
    tokens, so the episode counts once in either term. The metrics `pg_den` and `env_den` are
    the terms' denominators, so that a term over several batches is their means weighted by
    these (`echo_jax.rl.update.term_gradients`).
    """
    objective = objective_spec(cfg.objective)
    f32 = jnp.float32
    logp_BS = logp_BS.astype(f32)
    target_roles_BS = batch.roles_BT[:, 1:]
    action_BS = (target_roles_BS == roles.ACTION).astype(f32)
    observation_BS = (
        (target_roles_BS == roles.ENV_OUTPUT) | (target_roles_BS == roles.WARNING)
    ).astype(f32)
    selected_BS = world_targets(target_roles_BS, cfg.world_loss_target).astype(f32)
    if batch.env_weight_BS is not None:
        selected_BS = selected_BS * batch.env_weight_BS.astype(f32)

    pg_loss, pg_den, clip_frac, n_action = _pg_term(logp_BS, action_BS, batch, cfg)
    ce_BS = -logp_BS
    selected_ce_B = (ce_BS * selected_BS).sum(axis=1)
    n_selected = selected_BS.sum()
    env_rows_B, env_den = _env_rows(selected_ce_B, n_selected, observation_BS, batch, cfg)
    env_loss = _safe_div(env_rows_B.sum(), env_den)
    env_term = env_loss
    if objective.uses_lam:
        if batch.lam_B is None:
            env_term = cfg.lam * env_loss
        else:
            env_term = _safe_div((env_rows_B * batch.lam_B.astype(f32)).sum(), env_den)
    loss = objective.combine(pg_loss, env_term)

    metrics = {
        "loss": loss,
        "pg_loss": pg_loss,
        "env_loss": env_loss,
        "env_ce": _safe_div(selected_ce_B.sum(), n_selected),
        "action_ce": _safe_div((ce_BS * action_BS).sum(), n_action),
        "clip_frac": clip_frac,
        "n_action": n_action,
        "n_env": n_selected,
        "pg_den": pg_den,
        "env_den": env_den,
    }
    return loss, metrics


def echo_loss(logits_BTV: Array, batch: Batch, cfg: LossConfig) -> tuple[Array, dict[str, Array]]:
    """L = L_pg(ACTION targets) + λ · CE(ENV_OUTPUT targets) (as cfg.objective combines them),
    a pure function of the logits and the batch. Given batch.old_logp_BS, the action term is
    the PPO-clip surrogate, otherwise REINFORCE-style -A·log p. Returns (loss, metrics).
    """
    return echo_loss_from_logprobs(label_logprobs(logits_BTV, batch.tokens_BT), batch, cfg)
