"""Token roles: what each token of a rendered episode is, and so which loss term may target it.

The integer values are part of the on-disk format of packed arrays; never renumber them.
"""

from typing import Final

import numpy as np

PAD: Final = 0  # Padding after the end of a row; never a target.
CONTEXT: Final = 1  # Task, tool list and every envelope the harness writes; never a target.
ACTION: Final = 2  # The agent's tool call and its closing marker; the policy-gradient target.
ENV_OUTPUT: Final = 3  # Tool result, tool error or verifier output; the world-model target.
WARNING: Final = 4  # Harness boilerplate; a world-model target only when world_loss_target="all".

NAMES: Final = ("pad", "context", "action", "env_output", "warning")
NUM_ROLES: Final = len(NAMES)


def validate(roles: np.ndarray, where: str) -> None:
    """Refuses role values outside the table, naming the array's origin."""
    bad = (roles < 0) | (roles >= NUM_ROLES)
    if np.any(bad):
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{where}: role value {int(roles[idx])} at index {idx} is outside the role table "
            f"0..{NUM_ROLES - 1} ({', '.join(NAMES)})"
        )
