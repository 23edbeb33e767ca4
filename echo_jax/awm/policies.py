"""Scripted behaviour policies for our AWM worlds: a solver per task template plus mistake modes.

A policy sees only the episode so far (its tool calls and their JSON observations), never the
database, so every id, price, stock level and date it uses is read from earlier tool results, as
an LLM agent would have to. Mistake modes inject the failures real agents make (hallucinated ids,
wrongly typed arguments, skipped steps, unknown tools, giving up, picking the runner-up) so that a
capture corpus holds both successes and failures for every task. The solvers themselves are in
`echo_jax.awm.solvers`; this module draws a mode and drives a solver through it. Capture loads
it by name (`policy_module`) for `load_task_params`, `choose_mode` and `make_policy`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from echo_jax.awm.solvers import SOLVERS
from echo_jax.awm.solvers.calls import Call, Choices, Solver, ToolError, parse_observation

MODES: tuple[str, ...] = (
    "solve",
    "explore",
    "unknown_tool",
    "wrong_id",
    "bad_arg_type",
    "skip_step",
    "give_up",
    "second_best",
    "wrong_quantity",
)
# Tuned by simulating every task of data/awm_worlds in-process, so that a capture holds about as
# many failures as successes; a corpus's measured success rate is in its manifest.json.
MODE_WEIGHTS: tuple[float, ...] = (0.22, 0.12, 0.08, 0.11, 0.11, 0.09, 0.09, 0.11, 0.07)
MAX_TOOL_CALLS = 12
RECOVER_PROB = 0.5
VERIFY_ACTION = {"tool_name": "verify", "arguments": {"verifier_mode": "code"}}

EXPLORE_CALLS: dict[str, tuple[tuple[str, dict], ...]] = {
    "e_commerce": (
        ("list_product_categories", {}),
        ("list_cart_items", {}),
        ("list_user_wishlists", {}),
        ("get_or_create_active_cart", {}),
    ),
    "clinic": (
        ("list_specialties", {}),
        ("list_locations", {}),
        ("get_current_patient", {}),
        ("list_my_appointments", {}),
    ),
    "library": (
        ("list_branches", {}),
        ("get_my_account", {}),
        ("list_my_loans", {}),
        ("list_my_holds", {}),
    ),
}
UNKNOWN_TOOLS: dict[str, tuple[str, ...]] = {
    "e_commerce": ("add_to_cart", "find_products", "checkout_cart"),
    "clinic": ("book_slot", "find_doctor", "get_appointments"),
    "library": ("borrow_book", "find_book", "renew_all_loans"),
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class Policy(Protocol):
    def next_action(self, steps: list[dict]) -> dict: ...


QUANTITY_TEMPLATES = frozenset(
    {"cart_top_rated_under_budget", "cart_cheapest_in_stock", "cart_update_quantity"}
)
NO_CHOICE_TEMPLATES = frozenset({"renew_due_by"})


def _effective_mode(template: str, mode: str) -> str:
    """Swap a mistake that a template cannot express for one that it can."""
    if mode == "wrong_quantity" and template not in QUANTITY_TEMPLATES:
        mode = "second_best"
    if mode == "second_best" and template in NO_CHOICE_TEMPLATES:
        mode = "skip_step"
    return mode


def _corrupt_type(name: str, value: Any) -> str:
    """A wrongly typed version of an integer argument, as LLM agents often produce."""
    if name.endswith("_id"):
        return f"{name[:-3]}_{value}"
    return NUMBER_WORDS[value] if isinstance(value, int) and 0 <= value < 10 else f"{value} units"


class ScriptedPolicy:
    """Drives a solver one tool call at a time and injects its mode's mistake along the way."""

    def __init__(self, solver: Solver, mode: str, rng: np.random.Generator, domain: str) -> None:
        self._solver = solver
        self._mode = mode
        self._rng = rng
        self._calls = 0
        self._started = False
        self._finished = False
        self._mistake_done = False
        self._kind = "solver"
        self._queued: Call | None = None
        explore = list(EXPLORE_CALLS[domain])
        self._explore = [
            explore[int(i)] for i in rng.permutation(len(explore))[: rng.integers(1, 4)]
        ]
        self._explore_at = set(
            int(i) for i in rng.choice(5, size=len(self._explore), replace=False)
        )
        self._unknown_tool = UNKNOWN_TOOLS[domain][int(rng.integers(len(UNKNOWN_TOOLS[domain])))]
        self._unknown_at = int(rng.integers(0, 3))
        self._give_up_after = int(rng.integers(1, 3))

    def next_action(self, steps: list[dict]) -> dict:
        if self._finished or self._calls >= MAX_TOOL_CALLS:
            return self._verify()
        call = self._advance(steps[-1]["observation"] if steps else None)
        return self._verify() if call is None else self._emit(call)

    def _verify(self) -> dict:
        self._finished = True
        return dict(VERIFY_ACTION)

    def _resume(self, value: Any = None, error: ToolError | None = None) -> Call | None:
        """Next call of the solver; None once it is done or gave up on an error."""
        try:
            if not self._started:
                self._started = True
                return next(self._solver)
            if error is not None:
                return self._solver.throw(error)
            return self._solver.send(value)
        except (StopIteration, ToolError):
            return None

    def _advance(self, observation: dict | None) -> Call | None:
        if not self._started:
            return self._resume()
        kind, queued = self._kind, self._queued
        if kind == "noise":
            return queued
        try:
            value = parse_observation(observation or {})
        except ToolError as err:
            if kind == "mistake":
                return queued if self._rng.random() < RECOVER_PROB else None
            return self._resume(error=err)
        return self._resume(value)

    def _emit(self, call: Call) -> dict:
        mode, first_mistake = self._mode, not self._mistake_done
        if mode == "give_up" and (call.writes or self._calls >= self._give_up_after):
            return self._verify()
        if mode == "skip_step" and call.writes and first_mistake:
            self._mistake_done = True
            following = self._resume(None)
            return self._verify() if following is None else self._emit(following)
        if mode == "unknown_tool" and first_mistake and self._calls >= self._unknown_at:
            self._mistake_done = True
            return self._send("noise", call, {"tool_name": self._unknown_tool, "arguments": {}})
        if mode == "explore" and self._explore and self._calls in self._explore_at:
            tool_name, arguments = self._explore.pop()
            return self._send("noise", call, {"tool_name": tool_name, "arguments": dict(arguments)})
        if mode == "wrong_id" and first_mistake and call.id_arg:
            self._mistake_done = True
            value = call.arguments[call.id_arg]
            wrong = (value + 1000, 9999, 10 * value + 7)[int(self._rng.integers(3))]
            return self._send("mistake", call, call.action(**{call.id_arg: wrong}))
        target = call.int_arg or call.id_arg
        if mode == "bad_arg_type" and first_mistake and call.writes and target:
            self._mistake_done = True
            bad = _corrupt_type(target, call.arguments[target])
            return self._send("mistake", call, call.action(**{target: bad}))
        return self._send("solver", None, call.action())

    def _send(self, kind: str, queued: Call | None, action: dict) -> dict:
        self._kind, self._queued = kind, queued
        self._calls += 1
        return action


def domain_of(scenario: str) -> str:
    """`e_commerce_105` -> `e_commerce`."""
    return scenario.rstrip("0123456789").rstrip("_")


def load_task_params(world_dir: str | os.PathLike) -> dict[tuple[str, int], dict]:
    """(scenario, task_idx) -> {"template", "params"} from the world's echo_task_params.jsonl."""
    table = {}
    with open(Path(world_dir) / "echo_task_params.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                table[(row["scenario"], row["task_idx"])] = {
                    "template": row["template"],
                    "params": row["params"],
                }
    return table


def choose_mode(rng: np.random.Generator) -> str:
    """Draw a behaviour mode with the capture mixture (roughly half the episodes succeed)."""
    return MODES[int(rng.choice(len(MODES), p=np.asarray(MODE_WEIGHTS) / sum(MODE_WEIGHTS)))]


def make_policy(
    scenario: str, task_idx: int, params: dict, mode: str, rng: np.random.Generator
) -> Policy:
    """A policy for one episode.

    `params` is the whole table from load_task_params (the capture harness passes it as is) or
    just this task's {"template", "params"} entry.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    entry = params.get((scenario, task_idx), params)
    template = entry["template"]
    mode = _effective_mode(template, mode)
    solver = SOLVERS[template](entry["params"], Choices(mode))
    return ScriptedPolicy(solver, mode, rng, domain_of(scenario))
