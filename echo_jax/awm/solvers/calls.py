"""What a scripted solver yields and is sent back, and where it makes judgement calls.

A solver is a generator: it yields the `Call`s it wants made and is sent each call's parsed JSON
result (or thrown a `ToolError`), so that it decides its next call from what it has seen, as an
LLM agent would. `Choices` is where a mistake mode bends one of its decisions.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any


class ToolError(Exception):
    """The observation of a tool call was an error (HTTP error body, unknown tool, bad JSON)."""


@dataclass(frozen=True)
class Call:
    """A tool call a solver wants to make, with the arguments a mistake mode may corrupt."""

    tool_name: str
    arguments: dict[str, Any]
    writes: bool = False
    id_arg: str | None = None
    int_arg: str | None = None

    def action(self, **overrides: Any) -> dict:
        return {"tool_name": self.tool_name, "arguments": {**self.arguments, **overrides}}


@dataclass
class Choices:
    """Where a solver makes a judgement call; the second_best/wrong_quantity modes bend it once."""

    mode: str
    _bent: set[str] = field(default_factory=set)

    def rank(self) -> int:
        """Index of the candidate to take from a ranking (1 once in second_best mode)."""
        if self.mode == "second_best" and "rank" not in self._bent:
            self._bent.add("rank")
            return 1
        return 0

    def pick(self, ranked: list) -> Any:
        return ranked[min(self.rank(), len(ranked) - 1)]

    def quantity(self, quantity: int) -> int:
        if self.mode == "wrong_quantity" and "quantity" not in self._bent:
            self._bent.add("quantity")
            return quantity + 1 if quantity < 3 else quantity - 1
        return quantity


Solver = Generator[Call, Any, None]


def parse_observation(observation: dict) -> Any:
    """JSON payload of a successful tool call; ToolError for anything an agent sees as failure."""
    if observation.get("error"):
        raise ToolError(str(observation["error"]))
    text = observation.get("tool_result")
    try:
        data = json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError:
        data = None
    if data is None or (isinstance(data, dict) and set(data) == {"detail"}):
        raise ToolError(str(text))
    return data


def pick_match(items: list[dict], matches: Callable[[dict], bool], ctx: Choices) -> dict | None:
    """The item the task names, or in second_best mode the runner-up that follows the matches
    (what a careless agent grabs); None when no item matches."""
    ranked = [i for i in items if matches(i)] + [i for i in items if not matches(i)]
    if not ranked or not matches(ranked[0]):
        return None
    return ctx.pick(ranked)


def find_match(
    listing: Call, key: str, matches: Callable[[dict], bool], ctx: Choices
) -> Generator[Call, Any, dict | None]:
    """Make the listing call and pick the item the task names from its `key` list (pick_match)."""
    listed = yield listing
    return pick_match(listed[key], matches, ctx)


def change_match(
    listing: Call,
    key: str,
    matches: Callable[[dict], bool],
    change: Callable[[dict], Call],
    ctx: Choices,
) -> Solver:
    """Find the item the task names, change it, and list again to see the change."""
    item = yield from find_match(listing, key, matches, ctx)
    if item is not None:
        yield change(item)
        yield listing
