"""An iteration's rollouts as training rows: the recorded token-exact rows as fixed [N, T]
arrays, with group-relative advantages, each row's weight in the policy and env terms (an
episode counts once in each however many rows it spans) and each target's weight in the env
term."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from echo_jax.agent.closed_loop import SUCCESS
from echo_jax.agent.policy import POLICY_KEY
from echo_jax.agent.rollout_rows import (
    EPISODE_ROWS,
    TOOL_ERROR,
    TOOL_RESULT,
    VERIFIER,
    WARNING_TEXT,
)
from echo_jax.awm.rewards import FORMAT_ERROR_TYPES
from echo_jax.config import RLConfig
from echo_jax.data import roles
from echo_jax.data.advantages import group_advantages
from echo_jax.data.vocab import PAD_ID


def rollout_stats(record: dict[str, Any]) -> dict[str, float]:
    """Shares of a rollout: over the calls the policy wrote, those that were valid tool calls
    (not a format error) and those that parsed; over all steps, format errors; and success."""
    types = record["step_reward_types"]
    written = [
        (s[POLICY_KEY], t) for s, t in zip(record["steps"], types, strict=True) if POLICY_KEY in s
    ]
    n = len(written)
    return {
        "valid_call_share": sum(t not in FORMAT_ERROR_TYPES for _, t in written) / n if n else 0.0,
        "parse_share": sum(p["parse_error"] is None for p, _ in written) / n if n else 0.0,
        "format_error_share": sum(t in FORMAT_ERROR_TYPES for t in types) / len(types),
        "success": float(types[-1] == SUCCESS),
    }


def training_reward(record: dict[str, Any], rl: RLConfig) -> float:
    """The verifier's reward, less the format penalty per share of format-error steps."""
    return record["reward"] - rl.format_penalty * rollout_stats(record)["format_error_share"]


def env_term_kept(record: dict[str, Any], rl: RLConfig) -> bool:
    stats = rollout_stats(record)
    return (
        stats["valid_call_share"] >= rl.min_valid_call_share
        and stats["parse_share"] >= rl.min_parse_share
    )


@dataclasses.dataclass(frozen=True)
class RolloutBatch:
    """An iteration's rollouts as training rows, N rows of T tokens."""

    tokens: np.ndarray  # int32 [N, T]: exactly what the sampler consumed and produced, PAD after
    roles: np.ndarray  # int8 [N, T]: each token's role as a target
    sample_logp: np.ndarray  # float32 [N, T-1]: recorded log-prob of each sampled target (else 0)
    advantage: np.ndarray  # float32 [N]: the episode's group-relative advantage
    pg_weight: np.ndarray  # float32 [N]: row's share of its episode's action tokens
    env_weight: np.ndarray  # float32 [N, T-1]: env-term weight of each target
    env_row_weight: np.ndarray  # float32 [N]: row's share of its episode's observation tokens
    episode: np.ndarray  # int32 [N]: index of the rollout
    rewards: np.ndarray  # float32 [E]: training reward per rollout
    informative: np.ndarray  # bool [E]: the rollout's group has more than one reward

    @property
    def num_rows(self) -> int:
        return int(self.tokens.shape[0])


def rollout_batch(records: Sequence[dict[str, Any]], rl: RLConfig, max_len: int) -> RolloutBatch:
    """The rollouts' recorded rows as arrays. Groups are (scenario, task_idx)."""
    keys = [(r["scenario"], r["task_idx"]) for r in records]
    group_ids = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    groups_E = np.array([group_ids[k] for k in keys], np.int32)
    rewards_E = np.array([training_reward(r, rl) for r in records], np.float32)
    adv_E = np.asarray(group_advantages(rewards_E, groups_E, len(group_ids)))
    spread_G = np.zeros(len(group_ids), bool)
    for g in range(len(group_ids)):
        spread_G[g] = np.ptp(rewards_E[groups_E == g]) > 0
    informative_E = spread_G[groups_E]
    kind_weight = np.zeros(8, np.float32)
    kind_weight[[TOOL_RESULT, TOOL_ERROR, VERIFIER, WARNING_TEXT]] = (
        rl.weight_tool_result, rl.weight_tool_error, rl.weight_verifier, rl.weight_warning
    )  # fmt: skip
    rows = [(e, row) for e, r in enumerate(records) for row in r[EPISODE_ROWS]]
    n, t = len(rows), max_len
    tokens = np.full((n, t), PAD_ID, np.int32)
    roles_NT = np.full((n, t), roles.PAD, np.int8)
    logp = np.zeros((n, t), np.float32)
    kinds = np.zeros((n, t), np.int32)
    for i, (_, row) in enumerate(rows):
        m = len(row["tokens"])
        if m > t:
            raise ValueError(f"a recorded row of {m} tokens does not fit max_len={t}")
        tokens[i, :m], roles_NT[i, :m] = row["tokens"], row["roles"]
        logp[i, :m], kinds[i, :m] = row["logp"], row["kinds"]
    episode = np.array([e for e, _ in rows], np.int32)
    actions_N = (roles_NT == roles.ACTION).sum(axis=1).astype(np.float32)
    actions_E = np.bincount(episode, actions_N, minlength=len(records))
    target_roles = roles_NT[:, 1:]
    obs_N = ((target_roles == roles.ENV_OUTPUT) | (target_roles == roles.WARNING)).sum(axis=1)
    obs_E = np.bincount(episode, obs_N.astype(np.float32), minlength=len(records))
    kept_E = np.array([env_term_kept(r, rl) for r in records], np.float32)
    if rl.drop_equal_reward_groups:
        kept_E = kept_E * informative_E
    env_weight = kind_weight[kinds[:, 1:]] * kept_E[episode][:, None]
    return RolloutBatch(
        tokens=tokens,
        roles=roles_NT,
        sample_logp=logp[:, 1:],
        advantage=adv_E[episode].astype(np.float32),
        pg_weight=(actions_N / np.maximum(actions_E[episode], 1.0)).astype(np.float32),
        env_weight=env_weight.astype(np.float32),
        env_row_weight=(obs_N / np.maximum(obs_E[episode], 1.0)).astype(np.float32),
        episode=episode,
        rewards=rewards_E,
        informative=informative_E,
    )
