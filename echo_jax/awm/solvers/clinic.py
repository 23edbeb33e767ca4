"""Solvers for the clinic worlds' task templates (booking, cancelling, rescheduling)."""

from __future__ import annotations

from collections.abc import Callable

from echo_jax.awm.solvers.calls import Call, Choices, Solver, change_match, find_match

SCHEDULED = Call("list_my_appointments", {"status": "scheduled"})


def _book(slot_id: int, reason: str) -> Solver:
    yield Call(
        "book_appointment", {"slot_id": slot_id, "reason": reason}, writes=True, id_arg="slot_id"
    )
    yield SCHEDULED


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


def _is_booked(p: dict) -> Callable[[dict], bool]:
    """Whether an appointment is the one the task names (its provider, on its date)."""
    return lambda a: a["provider_name"] == p["provider_name"] and a["start_time"][:10] == p["date"]


def solve_cancel_appointment(p: dict, ctx: Choices) -> Solver:
    def cancel(appointment: dict) -> Call:
        arguments = {"appointment_id": appointment["id"]}
        return Call("cancel_appointment", arguments, writes=True, id_arg="appointment_id")

    yield from change_match(SCHEDULED, "appointments", _is_booked(p), cancel, ctx)


def solve_reschedule_first_open(p: dict, ctx: Choices) -> Solver:
    appointment = yield from find_match(SCHEDULED, "appointments", _is_booked(p), ctx)
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
        yield SCHEDULED


SOLVERS = {
    "book_top_rated_at_location": solve_book_top_rated_at_location,
    "book_earliest_any_provider": solve_book_earliest_any_provider,
    "cancel_appointment": solve_cancel_appointment,
    "reschedule_first_open": solve_reschedule_first_open,
}
