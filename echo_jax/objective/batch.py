"""The one batch type the loss and the train step read, and the one function that builds it.

Offline training (`train.trainer.make_batch`) and the on-policy update (`rl.update`) both build
their batches with `batch_rows`, so both hand the step the same fields in the same dtypes.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from jax import Array

from echo_jax.data import roles


class Batch(NamedTuple):
    """B rows of T tokens; S = T - 1 targets per row (target s is token s+1). Every field has
    the rows on its leading axis (a stack of K batches, `train.make_train_steps`, puts K in
    front), so one sharding splits them all. An optional field left None is not an input:
    the loss then uses its default, and a jitted step traces once per set of fields given."""

    tokens_BT: Array  # int32 token ids.
    roles_BT: Array  # int32 role of each token (data.roles); a target's is roles_BT[:, 1:].
    advantages_B: Array  # float32 weight of each row's action targets (advantage or reward).
    old_logp_BS: Array | None = None  # float32 sampler's log-probs; given: the PPO-clip term.
    # float32 row's share of its episode in the sequence_mean policy term; None: 1. (token_mean
    # counts every action token once and reads no row weight.)
    pg_weight_B: Array | None = None
    env_weight_BS: Array | None = None  # float32 target's weight in the env term; None: 1.
    # float32 row's share of its episode in the full_observation_tokens env term; None: 1.
    env_row_weight_B: Array | None = None
    lam_B: Array | None = None  # float32 row's λ; None: LossConfig.lam (fixed at trace time).


def batch_rows(
    index: np.ndarray,
    tokens_NT: np.ndarray,
    roles_NT: np.ndarray,
    advantages_N: np.ndarray,
    *,
    old_logp_NS: np.ndarray | None = None,
    pg_weight_N: np.ndarray | None = None,
    env_weight_NS: np.ndarray | None = None,
    env_row_weight_N: np.ndarray | None = None,
    lam: float | None = None,
) -> Batch:
    """Rows `index` of N per-row host arrays as a Batch of numpy arrays in the step's dtypes.

    `index` is [B], or [K, B] for K batches stacked. An entry of -1 is an empty row (PAD tokens,
    every weight 0) padding a minibatch to the step's fixed size, so it never recompiles.
    `lam` (a scalar: λ of this update) fills lam_B.
    """
    index = np.asarray(index)
    n, t = tokens_NT.shape
    for name, x, shape in (
        ("roles", roles_NT, (n, t)),
        ("advantages", advantages_N, (n,)),
        ("old_logp", old_logp_NS, (n, t - 1)),
        ("pg_weight", pg_weight_N, (n,)),
        ("env_weight", env_weight_NS, (n, t - 1)),
        ("env_row_weight", env_row_weight_N, (n,)),
    ):
        if x is not None and x.shape != shape:
            raise ValueError(f"{name} has shape {x.shape}; {n} rows of {t} tokens need {shape}")
    empty = index < 0
    take = np.where(empty, 0, index)

    def rows(x: np.ndarray | None, dtype, fill=0):
        if x is None:
            return None
        out = x[take].astype(dtype, copy=False)  # A fresh array already: take copies.
        if empty.any():
            out[empty] = fill
        return out

    lam_B = None if lam is None else np.full(index.shape, lam, np.float32)
    return Batch(
        tokens_BT=rows(tokens_NT, np.int32),
        roles_BT=rows(roles_NT, np.int32, roles.PAD),
        advantages_B=rows(advantages_N, np.float32),
        old_logp_BS=rows(old_logp_NS, np.float32),
        pg_weight_B=rows(pg_weight_N, np.float32),
        env_weight_BS=rows(env_weight_NS, np.float32),
        env_row_weight_B=rows(env_row_weight_N, np.float32),
        lam_B=lam_B,
    )
