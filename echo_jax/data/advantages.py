"""Group-relative advantages (GRPO): each episode's reward against its group's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array

DEFAULT_EPS = 1e-6


def group_advantages(
    rewards_E: Array, groups_E: Array, num_groups: int, eps: float = DEFAULT_EPS
) -> Array:
    """A = (r - mean_group) / (std_group + eps), with the population std of the group.

    A group of one, or one whose rewards are all equal, gets advantage 0 (there is nothing to
    compare against), never a division by a zero std. `groups_E` holds ids in [0, num_groups).
    """
    rewards_E = jnp.asarray(rewards_E, jnp.float32)
    groups_E = jnp.asarray(groups_E, jnp.int32)
    count_G = jax.ops.segment_sum(jnp.ones_like(rewards_E), groups_E, num_groups)
    mean_G = jax.ops.segment_sum(rewards_E, groups_E, num_groups) / jnp.maximum(count_G, 1.0)
    centred_E = rewards_E - mean_G[groups_E]
    var_G = jax.ops.segment_sum(centred_E**2, groups_E, num_groups) / jnp.maximum(count_G, 1.0)
    std_E = jnp.sqrt(var_G)[groups_E]
    spread_G = jax.ops.segment_max(rewards_E, groups_E, num_groups) - jax.ops.segment_min(
        rewards_E, groups_E, num_groups
    )
    informative_E = (count_G[groups_E] > 1) & (spread_G[groups_E] > 0)
    return jnp.where(informative_E, centred_E / (std_E + eps), 0.0)
