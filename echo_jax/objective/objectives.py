"""The objectives table: each objective's name and how it combines the loss's two terms.
Registering a record here is all a new objective needs: LossConfig accepts its name, the loss
trains with it, flags list it and sweeps give it arms."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

from echo_jax.util.choices import ConfigError, pick


@dataclasses.dataclass(frozen=True)
class Objective:
    """How an objective combines the loss's two terms (echo_jax.objective.loss):
    loss = policy · L_pg + env · L_env, with L_env times λ when `env_times_lam`.

    The table is a leaf module (no JAX, nothing of this package but the error type), so
    LossConfig can check an objective's name where it is built and flags and sweeps can list
    the names; the loss reads the same records.
    """

    policy: float = 0.0  # Weight of the policy-gradient term on ACTION targets; 0: no reward read.
    env: float = 0.0  # Weight of the env cross-entropy term.
    env_times_lam: bool = False  # λ (LossConfig.lam or a batch's lam_B) scales the env term.

    def __post_init__(self) -> None:
        weights = (self.policy, self.env)
        if not all(math.isfinite(w) and w >= 0 for w in weights) or not any(weights):
            raise ConfigError(f"an objective's weights must be >= 0, one of them > 0: {self}")

    @property
    def uses_reward(self) -> bool:
        """Whether the rewards (through the advantages) reach the loss."""
        return self.policy != 0

    @property
    def uses_lam(self) -> bool:
        """Whether λ changes the loss (a sweep gives such an objective one arm per λ)."""
        return self.env_times_lam and self.env != 0

    def combine(self, pg_loss, env_term):
        """policy · pg_loss + env · env_term (env_term already times λ where λ applies). A term
        of weight 0 is left out, not multiplied by 0, so it cannot bring a NaN in; a weight of 1
        multiplies nothing, so the built-in objectives compute exactly what they always did."""
        weighted = ((self.policy, pg_loss), (self.env, env_term))
        terms = [x if w == 1 else w * x for w, x in weighted if w]
        return terms[0] if len(terms) == 1 else terms[0] + terms[1]


_OBJECTIVES: dict[str, Objective] = {
    "grpo": Objective(policy=1.0),  # The GRPO baseline: the action term alone.
    "echo": Objective(policy=1.0, env=1.0, env_times_lam=True),  # L_pg + λ · L_env.
    "verifier_free": Objective(env=1.0),  # The env cross-entropy alone; the reward is unused.
}


def register_objective(name: str, objective: Objective) -> None:
    """Adds an objective under `name`: LossConfig accepts it, the loss trains with it, and flags
    and sweeps built afterwards list it. A name is registered once (a jitted step keys its
    cache on the name, so a name may not change meaning)."""
    if not name.isidentifier():
        raise ConfigError(f"objective name {name!r} is not an identifier")
    if _OBJECTIVES.get(name, objective) != objective:
        raise ConfigError(f"objective {name!r} is already registered as {_OBJECTIVES[name]}")
    _OBJECTIVES[name] = objective


def unregister_objective(name: str) -> None:
    """Removes an objective added by register_objective (tests clean up with it)."""
    del _OBJECTIVES[name]


def objective_spec(name: str) -> Objective:
    """The record of objective `name`; ConfigError if there is none."""
    return pick("objective", name, _OBJECTIVES)


class _ObjectiveNames(Sequence[str]):
    """The registered objectives' names, read live from the table (flags, sweeps, checks)."""

    def __getitem__(self, i):
        return tuple(_OBJECTIVES)[i]

    def __len__(self) -> int:
        return len(_OBJECTIVES)

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(_OBJECTIVES))

    def __repr__(self) -> str:
        return repr(tuple(_OBJECTIVES))


OBJECTIVES: Sequence[str] = _ObjectiveNames()
