"""Scripted behaviour policies for our AWM worlds: one solver per task template plus mistake modes.

A policy sees only the episode so far (its tool calls and their JSON observations), never the
database, so every id, price, stock level and date it uses is read from earlier tool results, as
an LLM agent would have to. Mistake modes inject the failures real agents make (hallucinated ids,
wrongly typed arguments, skipped steps, unknown tools, giving up, picking the runner-up) so that a
capture corpus holds both successes and failures for every task.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

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
# Tuned by simulating every task of data/awm_worlds in-process: ~50% of episodes succeed.
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


def _matching_first(items: list[dict], matches: Callable[[dict], bool]) -> list[dict]:
    """Items that match the request first, the rest after (what second_best may grab)."""
    return [i for i in items if matches(i)] + [i for i in items if not matches(i)]


# --- e-commerce solvers ---------------------------------------------------------------------


def _add_offer_to_cart(offer_id: int, quantity: int) -> Solver:
    yield Call("get_or_create_active_cart", {})
    yield Call(
        "add_item_to_cart",
        {"product_offer_id": offer_id, "quantity": quantity},
        writes=True,
        id_arg="product_offer_id",
        int_arg="quantity",
    )
    yield Call("list_cart_items", {})


def solve_cart_top_rated_under_budget(p: dict, ctx: Choices) -> Solver:
    found = yield Call(
        "search_products", {"query": p["query"], "sort_by": "average_rating", "limit": 5}
    )
    ranked = sorted(
        found["products"],
        key=lambda h: (
            -h["aggregates"]["average_rating"],
            -h["aggregates"]["review_count"],
            h["product"]["id"],
        ),
    )
    want, picks = ctx.rank(), []
    for hit in ranked:
        lowest = hit["lowest_active_offer"]
        if lowest is None or lowest["price"] >= p["budget"]:
            continue
        listed = yield Call(
            "list_product_offers", {"product_id": hit["product"]["id"]}, id_arg="product_id"
        )
        valid = [
            o
            for o in listed["offers"]
            if o["is_active"]
            and o["price"] < p["budget"]
            and o["in_stock_quantity"] >= p["quantity"]
        ]
        if valid:
            picks.append(min(valid, key=lambda o: (o["price"], o["id"])))
            if len(picks) > want:
                break
    if picks:
        yield from _add_offer_to_cart(
            picks[min(want, len(picks) - 1)]["id"], ctx.quantity(p["quantity"])
        )


def solve_cart_cheapest_in_stock(p: dict, ctx: Choices) -> Solver:
    found = yield Call("search_products", {"query": p["query"], "sort_by": "price_asc", "limit": 5})
    listed = [h for h in found["products"] if h["lowest_active_offer"]]
    listed.sort(key=lambda h: h["lowest_active_offer"]["price"])
    need, pool = ctx.rank() + 1, []
    for hit in listed:
        if len(pool) >= need and hit["lowest_active_offer"]["price"] >= pool[need - 1]["price"]:
            break
        offers = yield Call(
            "list_product_offers", {"product_id": hit["product"]["id"]}, id_arg="product_id"
        )
        pool += [
            o
            for o in offers["offers"]
            if o["is_active"] and o["in_stock_quantity"] >= p["quantity"]
        ]
        pool.sort(key=lambda o: (o["price"], o["id"]))
    if pool:
        offer = pool[min(need - 1, len(pool) - 1)]
        yield from _add_offer_to_cart(offer["id"], ctx.quantity(p["quantity"]))


def _find_cart_line(p: dict, ctx: Choices) -> Generator[Call, Any, dict | None]:
    cart = yield Call("list_cart_items", {})
    items = _matching_first(cart["items"], lambda i: i["product_title"] == p["title"])
    if not items or items[0]["product_title"] != p["title"]:
        return None
    return ctx.pick(items)


def solve_cart_update_quantity(p: dict, ctx: Choices) -> Solver:
    item = yield from _find_cart_line(p, ctx)
    if item is None:
        return
    yield Call(
        "update_cart_item_quantity",
        {"cart_item_id": item["id"], "quantity": ctx.quantity(p["quantity"])},
        writes=True,
        id_arg="cart_item_id",
        int_arg="quantity",
    )
    yield Call("list_cart_items", {})


def solve_cart_remove_item(p: dict, ctx: Choices) -> Solver:
    item = yield from _find_cart_line(p, ctx)
    if item is None:
        return
    yield Call("remove_cart_item", {"cart_item_id": item["id"]}, writes=True, id_arg="cart_item_id")
    yield Call("list_cart_items", {})


def solve_wishlist_best_seller(p: dict, ctx: Choices) -> Solver:
    found = yield Call(
        "search_products", {"query": p["query"], "sort_by": "sales_rank", "limit": 5}
    )
    ranked = sorted(found["products"], key=lambda h: h["aggregates"]["sales_rank"])
    if not ranked:
        return
    product_id = ctx.pick(ranked)["product"]["id"]
    lists = yield Call("list_user_wishlists", {})
    wishlist = next(
        (w for w in lists["wishlists"] if w["name"].lower() == p["wishlist"].lower()), None
    )
    if wishlist is None:
        return
    yield Call(
        "add_item_to_wishlist",
        {"wishlist_id": wishlist["id"], "product_id": product_id},
        writes=True,
        id_arg="product_id",
    )
    yield Call("list_wishlist_items", {"wishlist_id": wishlist["id"]})


# --- clinic solvers -------------------------------------------------------------------------


def _book(slot_id: int, reason: str) -> Solver:
    yield Call(
        "book_appointment", {"slot_id": slot_id, "reason": reason}, writes=True, id_arg="slot_id"
    )
    yield Call("list_my_appointments", {"status": "scheduled"})


def solve_book_top_rated_at_location(p: dict, ctx: Choices) -> Solver:
    listed = yield Call("list_locations", {})
    location = next((x for x in listed["locations"] if x["name"] == p["location"]), None)
    if location is None:
        return
    found = yield Call(
        "search_providers",
        {"specialty": p["specialty"], "location_id": location["id"]},
        id_arg="location_id",
    )
    ranked = sorted(found["providers"], key=lambda x: (-x["rating"], x["id"]))
    if not ranked:
        return
    provider = ctx.pick(ranked)
    open_slots = yield Call(
        "list_available_slots",
        {"provider_id": provider["id"], "start_date": p["date"], "limit": 5},
        id_arg="provider_id",
    )
    if open_slots["slots"]:
        yield from _book(open_slots["slots"][0]["id"], p["reason"])


def solve_book_earliest_any_provider(p: dict, ctx: Choices) -> Solver:
    found = yield Call("search_providers", {"specialty": p["specialty"]})
    firsts = []
    for provider in found["providers"]:
        open_slots = yield Call(
            "list_available_slots",
            {
                "provider_id": provider["id"],
                "start_date": p["start_date"],
                "end_date": p["end_date"],
                "limit": 3,
            },
            id_arg="provider_id",
        )
        firsts += open_slots["slots"][:1]
    if firsts:
        slot = ctx.pick(sorted(firsts, key=lambda s: (s["start_time"], s["id"])))
        yield from _book(slot["id"], p["reason"])


def _find_appointment(p: dict, ctx: Choices) -> Generator[Call, Any, dict | None]:
    listed = yield Call("list_my_appointments", {"status": "scheduled"})
    appointments = _matching_first(
        listed["appointments"],
        lambda a: a["provider_name"] == p["provider_name"] and a["start_time"][:10] == p["date"],
    )
    if not appointments or appointments[0]["provider_name"] != p["provider_name"]:
        return None
    return ctx.pick(appointments)


def solve_cancel_appointment(p: dict, ctx: Choices) -> Solver:
    appointment = yield from _find_appointment(p, ctx)
    if appointment is None:
        return
    yield Call(
        "cancel_appointment",
        {"appointment_id": appointment["id"]},
        writes=True,
        id_arg="appointment_id",
    )
    yield Call("list_my_appointments", {"status": "scheduled"})


def solve_reschedule_first_open(p: dict, ctx: Choices) -> Solver:
    appointment = yield from _find_appointment(p, ctx)
    if appointment is None:
        return
    open_slots = yield Call(
        "list_available_slots",
        {"provider_id": appointment["provider_id"], "start_date": p["new_date"], "limit": 5},
        id_arg="provider_id",
    )
    if open_slots["slots"]:
        yield Call(
            "reschedule_appointment",
            {"appointment_id": appointment["id"], "new_slot_id": open_slots["slots"][0]["id"]},
            writes=True,
            id_arg="new_slot_id",
        )
        yield Call("list_my_appointments", {"status": "scheduled"})


# --- library solvers ------------------------------------------------------------------------


def _branch_id(listed: dict, name: str) -> int | None:
    return next((b["id"] for b in listed["branches"] if b["name"] == name), None)


def solve_checkout_top_rated_available(p: dict, ctx: Choices) -> Solver:
    branch_id = _branch_id((yield Call("list_branches", {})), p["branch"])
    if branch_id is None:
        return
    found = yield Call(
        "search_catalog",
        {
            "genre": p["genre"],
            "published_after": p["year"],
            "sort_by": "average_rating",
            "limit": 10,
        },
    )
    ranked = sorted(
        found["books"],
        key=lambda e: (-e["book"]["average_rating"], -e["book"]["ratings_count"], e["book"]["id"]),
    )
    want, picks = ctx.rank(), []
    for entry in ranked:
        if entry["availability"]["available_copies"] == 0:
            continue
        copies = yield Call(
            "list_book_copies",
            {"book_id": entry["book"]["id"], "branch_id": branch_id, "status": "available"},
            id_arg="book_id",
        )
        if copies["copies"]:
            picks.append(copies["copies"][0])
            if len(picks) > want:
                break
    if picks:
        copy_id = picks[min(want, len(picks) - 1)]["id"]
        yield Call("checkout_copy", {"copy_id": copy_id}, writes=True, id_arg="copy_id")
        yield Call("list_my_loans", {"status": "active"})


def solve_renew_due_by(p: dict, ctx: Choices) -> Solver:
    listed = yield Call("list_my_loans", {"status": "active"})
    for loan in listed["loans"]:
        if loan["due_date"] <= p["date"]:
            yield Call("renew_loan", {"loan_id": loan["id"]}, writes=True, id_arg="loan_id")
    yield Call("list_my_loans", {"status": "active"})


def solve_return_book(p: dict, ctx: Choices) -> Solver:
    listed = yield Call("list_my_loans", {"status": "active"})
    loans = _matching_first(listed["loans"], lambda ln: ln["title"] == p["title"])
    if not loans or loans[0]["title"] != p["title"]:
        return
    loan = ctx.pick(loans)
    yield Call("return_loan", {"loan_id": loan["id"]}, writes=True, id_arg="loan_id")
    yield Call("list_my_loans", {"status": "active"})


def solve_place_hold(p: dict, ctx: Choices) -> Solver:
    listed = yield Call("list_branches", {})
    branches = _matching_first(listed["branches"], lambda b: b["name"] == p["branch"])
    if not branches or branches[0]["name"] != p["branch"]:
        return
    branch = ctx.pick(branches)
    found = yield Call("search_catalog", {"query": p["title"], "limit": 5})
    book = next(
        (e["book"] for e in found["books"] if e["book"]["title"].lower() == p["title"].lower()),
        None,
    )
    if book is None:
        return
    yield Call(
        "place_hold",
        {"book_id": book["id"], "pickup_branch_id": branch["id"]},
        writes=True,
        id_arg="book_id",
    )
    yield Call("list_my_holds", {})


SOLVERS: dict[str, Callable[[dict, Choices], Solver]] = {
    "cart_top_rated_under_budget": solve_cart_top_rated_under_budget,
    "cart_cheapest_in_stock": solve_cart_cheapest_in_stock,
    "cart_update_quantity": solve_cart_update_quantity,
    "cart_remove_item": solve_cart_remove_item,
    "wishlist_best_seller": solve_wishlist_best_seller,
    "book_top_rated_at_location": solve_book_top_rated_at_location,
    "book_earliest_any_provider": solve_book_earliest_any_provider,
    "cancel_appointment": solve_cancel_appointment,
    "reschedule_first_open": solve_reschedule_first_open,
    "checkout_top_rated_available": solve_checkout_top_rated_available,
    "renew_due_by": solve_renew_due_by,
    "return_book": solve_return_book,
    "place_hold": solve_place_hold,
}
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
