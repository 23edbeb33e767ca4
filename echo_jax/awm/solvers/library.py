"""Solvers for the library worlds' task templates (checkouts, renewals, returns, holds)."""

from __future__ import annotations

from echo_jax.awm.solvers.calls import Call, Choices, Solver, change_match, find_match

ACTIVE_LOANS = Call("list_my_loans", {"status": "active"})


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
        yield ACTIVE_LOANS


def solve_renew_due_by(p: dict, ctx: Choices) -> Solver:
    listed = yield ACTIVE_LOANS
    for loan in listed["loans"]:
        if loan["due_date"] <= p["date"]:
            yield Call("renew_loan", {"loan_id": loan["id"]}, writes=True, id_arg="loan_id")
    yield ACTIVE_LOANS


def solve_return_book(p: dict, ctx: Choices) -> Solver:
    def give_back(loan: dict) -> Call:
        return Call("return_loan", {"loan_id": loan["id"]}, writes=True, id_arg="loan_id")

    yield from change_match(
        ACTIVE_LOANS, "loans", lambda ln: ln["title"] == p["title"], give_back, ctx
    )


def solve_place_hold(p: dict, ctx: Choices) -> Solver:
    branches = Call("list_branches", {})
    branch = yield from find_match(branches, "branches", lambda b: b["name"] == p["branch"], ctx)
    if branch is None:
        return
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


SOLVERS = {
    "checkout_top_rated_available": solve_checkout_top_rated_available,
    "renew_due_by": solve_renew_due_by,
    "return_book": solve_return_book,
    "place_hold": solve_place_hold,
}
