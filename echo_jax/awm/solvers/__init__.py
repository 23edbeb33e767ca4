"""Scripted solvers for our generated worlds, one per task template (`echo_jax.awm.policies`
drives them and injects the mistakes)."""

from __future__ import annotations

from collections.abc import Callable

from echo_jax.awm.solvers import clinic, e_commerce, library
from echo_jax.awm.solvers.calls import Choices, Solver

SOLVERS: dict[str, Callable[[dict, Choices], Solver]] = {
    **e_commerce.SOLVERS,
    **clinic.SOLVERS,
    **library.SOLVERS,
}
