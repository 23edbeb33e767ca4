"""Public library API: catalogue search, copies per branch, loans, renewals and holds.

Every route's operation_id is the MCP tool name an agent calls; the signed-in member is member 1.
"""

import os
from datetime import date, timedelta
from typing import Literal

import uvicorn
from fastapi import FastAPI, HTTPException, Query
from pydantic import BaseModel, Field
from sqlalchemy import create_engine, text

DATABASE_URL = os.environ.get("DATABASE_PATH", "sqlite:///./library.db")
CURRENT_MEMBER_ID = 1
LOAN_DAYS = 21
RENEWAL_DAYS = 14
MAX_RENEWALS = 2

engine = create_engine(DATABASE_URL, connect_args={"check_same_thread": False})
app = FastAPI(title="Public Library API", version="1.0.0")

LOAN_SQL = (
    "SELECT ln.id, ln.copy_id, c.book_id, b.title, b.author, br.name AS branch_name, "
    "ln.checked_out_at, ln.due_date, ln.renewal_count, ln.status, ln.returned_at FROM loans ln "
    "JOIN copies c ON c.id = ln.copy_id JOIN books b ON b.id = c.book_id "
    "JOIN branches br ON br.id = c.branch_id"
)
HOLD_SQL = (
    "SELECT h.id, h.book_id, b.title, h.pickup_branch_id, br.name AS pickup_branch_name, "
    "h.status, h.created_at FROM holds h JOIN books b ON b.id = h.book_id "
    "JOIN branches br ON br.id = h.pickup_branch_id"
)


def now_iso() -> str:
    """The world's current time from its one-row world_clock table, never the wall clock, so the
    same calls against a fresh copy of the database always give the same results."""
    return fetch_one("SELECT now FROM world_clock WHERE id = 1")["now"]


def fetch_all(sql: str, **params) -> list[dict]:
    with engine.connect() as conn:
        return [dict(row) for row in conn.execute(text(sql), params).mappings()]


def fetch_one(sql: str, **params) -> dict | None:
    rows = fetch_all(sql, **params)
    return rows[0] if rows else None


def availability(book_id: int) -> dict:
    return fetch_one(
        "SELECT COUNT(*) AS total_copies, COALESCE(SUM(status = 'available'), 0) "
        "AS available_copies FROM copies WHERE book_id = :bid",
        bid=book_id,
    )


def require_book(book_id: int) -> dict:
    row = fetch_one("SELECT * FROM books WHERE id = :bid", bid=book_id)
    if row is None:
        raise HTTPException(status_code=404, detail=f"Book {book_id} not found")
    return row


def require_branch(branch_id: int) -> dict:
    row = fetch_one("SELECT * FROM branches WHERE id = :bid", bid=branch_id)
    if row is None:
        raise HTTPException(status_code=404, detail=f"Branch {branch_id} not found")
    return row


def my_loan(loan_id: int) -> dict:
    row = fetch_one(
        LOAN_SQL + " WHERE ln.id = :lid AND ln.member_id = :mid", lid=loan_id, mid=CURRENT_MEMBER_ID
    )
    if row is None:
        raise HTTPException(status_code=404, detail=f"Loan {loan_id} not found")
    return row


def require_active(loan: dict) -> None:
    if loan["status"] != "active":
        raise HTTPException(status_code=409, detail=f"Loan {loan['id']} is already returned")


class CheckoutRequest(BaseModel):
    copy_id: int = Field(..., description="ID of an available copy")


class PlaceHoldRequest(BaseModel):
    book_id: int = Field(..., description="ID of the book to reserve")
    pickup_branch_id: int = Field(..., description="Branch where the member will pick it up")


@app.get(
    "/branches",
    operation_id="list_branches",
    tags=["catalog"],
    summary="List library branches",
    response_description="branches: [{id, name, address, opening_hours}]",
)
def list_branches():
    """All branches of the library network."""
    return {"branches": fetch_all("SELECT * FROM branches ORDER BY id")}


@app.get(
    "/catalog/search",
    operation_id="search_catalog",
    tags=["catalog"],
    summary="Search the catalogue",
    response_description="books: [{book, availability: {total_copies, available_copies}}], total",
)
def search_catalog(
    query: str | None = Query(None, description="Words that must appear in title or author"),
    genre: str | None = Query(None, description="Genre name, e.g. 'Mystery'"),
    published_after: int | None = Query(None, description="Only books published after this year"),
    sort_by: Literal["relevance", "average_rating", "published_year", "title"] = "relevance",
    limit: int = Query(10, ge=1, le=50),
):
    """Books matching keywords/genre/year with network-wide copy availability."""
    rows = fetch_all("SELECT * FROM books ORDER BY id")
    tokens = (query or "").lower().split()
    hits = [
        r
        for r in rows
        if all(t in f"{r['title']} {r['author']}".lower() for t in tokens)
        and (genre is None or r["genre"].lower() == genre.strip().lower())
        and (published_after is None or r["published_year"] > published_after)
    ]
    if sort_by == "average_rating":
        hits.sort(key=lambda r: (-r["average_rating"], -r["ratings_count"], r["id"]))
    elif sort_by == "published_year":
        hits.sort(key=lambda r: (-r["published_year"], r["id"]))
    elif sort_by == "title":
        hits.sort(key=lambda r: (r["title"], r["id"]))
    books = [{"book": r, "availability": availability(r["id"])} for r in hits[:limit]]
    return {"books": books, "total": len(hits)}


@app.get(
    "/books/{book_id}",
    operation_id="get_book_by_id",
    tags=["catalog"],
    summary="Get book details",
    response_description="book, availability_by_branch: [{branch_id, branch_name, ...}]",
)
def get_book_by_id(book_id: int):
    """A book with how many copies each branch holds and has on the shelf."""
    book = require_book(book_id)
    per_branch = fetch_all(
        "SELECT br.id AS branch_id, br.name AS branch_name, COUNT(*) AS total_copies, "
        "SUM(c.status = 'available') AS available_copies FROM copies c "
        "JOIN branches br ON br.id = c.branch_id WHERE c.book_id = :bid "
        "GROUP BY br.id ORDER BY br.id",
        bid=book_id,
    )
    return {"book": book, "availability_by_branch": per_branch}


@app.get(
    "/books/{book_id}/copies",
    operation_id="list_book_copies",
    tags=["catalog"],
    summary="List physical copies of a book",
    response_description="book_id, copies: [{id, barcode, branch_id, branch_name, status}]",
)
def list_book_copies(
    book_id: int,
    branch_id: int | None = Query(None, description="Only copies held by this branch"),
    status: Literal["available", "on_loan", "on_hold_shelf"] | None = None,
):
    """Physical copies of a book, their branch and whether they are on the shelf."""
    require_book(book_id)
    sql = (
        "SELECT c.id, c.barcode, c.branch_id, br.name AS branch_name, c.status, c.condition "
        "FROM copies c JOIN branches br ON br.id = c.branch_id WHERE c.book_id = :bid"
    )
    params: dict = {"bid": book_id}
    if branch_id is not None:
        require_branch(branch_id)
        sql += " AND c.branch_id = :brid"
        params["brid"] = branch_id
    if status is not None:
        sql += " AND c.status = :status"
        params["status"] = status
    return {"book_id": book_id, "copies": fetch_all(sql + " ORDER BY c.id", **params)}


@app.get(
    "/members/me",
    operation_id="get_my_account",
    tags=["account"],
    summary="Get my member account",
    response_description="member: {id, full_name, card_number, max_loans, active_loans, ...}",
)
def get_my_account():
    """The signed-in member's account with loan limits and fines."""
    member = fetch_one("SELECT * FROM members WHERE id = :mid", mid=CURRENT_MEMBER_ID)
    member["active_loans"] = fetch_one(
        "SELECT COUNT(*) AS n FROM loans WHERE member_id = :mid AND status = 'active'",
        mid=CURRENT_MEMBER_ID,
    )["n"]
    return {"member": member}


@app.get(
    "/loans",
    operation_id="list_my_loans",
    tags=["loans"],
    summary="List my loans",
    response_description="loans: [{id, copy_id, title, due_date, renewal_count, status, ...}]",
)
def list_my_loans(status: Literal["active", "returned", "all"] = "active"):
    """The member's loans, soonest due first."""
    sql = LOAN_SQL + " WHERE ln.member_id = :mid"
    params: dict = {"mid": CURRENT_MEMBER_ID}
    if status != "all":
        sql += " AND ln.status = :status"
        params["status"] = status
    return {"loans": fetch_all(sql + " ORDER BY ln.due_date, ln.id", **params)}


@app.post(
    "/loans",
    operation_id="checkout_copy",
    tags=["loans"],
    summary="Check out a copy",
    response_description="loan: {id, copy_id, title, due_date, status, ...}",
)
def checkout_copy(body: CheckoutRequest):
    """Borrow an available copy; the loan runs for three weeks."""
    copy = fetch_one("SELECT * FROM copies WHERE id = :cid", cid=body.copy_id)
    if copy is None:
        raise HTTPException(status_code=404, detail=f"Copy {body.copy_id} not found")
    if copy["status"] != "available":
        raise HTTPException(
            status_code=409, detail=f"Copy {copy['id']} is not available ({copy['status']})"
        )
    member = get_my_account()["member"]
    if member["active_loans"] >= member["max_loans"]:
        raise HTTPException(
            status_code=409, detail=f"Loan limit reached ({member['max_loans']} active loans)"
        )
    stamp = now_iso()
    due = (date.fromisoformat(stamp[:10]) + timedelta(days=LOAN_DAYS)).isoformat()
    with engine.begin() as conn:
        result = conn.execute(
            text(
                "INSERT INTO loans (member_id, copy_id, checked_out_at, due_date, renewal_count, "
                "status) VALUES (:mid, :cid, :ts, :due, 0, 'active')"
            ),
            {"mid": CURRENT_MEMBER_ID, "cid": copy["id"], "ts": stamp, "due": due},
        )
        conn.execute(
            text("UPDATE copies SET status = 'on_loan' WHERE id = :cid"), {"cid": copy["id"]}
        )
    return {"loan": my_loan(result.lastrowid)}


@app.post(
    "/loans/{loan_id}/return",
    operation_id="return_loan",
    tags=["loans"],
    summary="Return a borrowed copy",
    response_description="loan: {id, status: 'returned', returned_at, ...}",
)
def return_loan(loan_id: int):
    """Return a borrowed copy; it goes back on the shelf."""
    loan = my_loan(loan_id)
    require_active(loan)
    stamp = now_iso()
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE loans SET status = 'returned', returned_at = :ts WHERE id = :lid"),
            {"ts": stamp, "lid": loan_id},
        )
        conn.execute(
            text("UPDATE copies SET status = 'available' WHERE id = :cid"), {"cid": loan["copy_id"]}
        )
    return {"loan": my_loan(loan_id)}


@app.post(
    "/loans/{loan_id}/renew",
    operation_id="renew_loan",
    tags=["loans"],
    summary="Renew a loan",
    response_description="loan: {id, due_date, renewal_count, ...}",
)
def renew_loan(loan_id: int):
    """Extend an active loan by two weeks from its due date (at most twice)."""
    loan = my_loan(loan_id)
    require_active(loan)
    if loan["renewal_count"] >= MAX_RENEWALS:
        raise HTTPException(
            status_code=409, detail=f"Loan {loan_id} has reached the renewal limit ({MAX_RENEWALS})"
        )
    new_due = (date.fromisoformat(loan["due_date"]) + timedelta(days=RENEWAL_DAYS)).isoformat()
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE loans SET due_date = :due, renewal_count = renewal_count + 1 "
                "WHERE id = :lid"
            ),
            {"due": new_due, "lid": loan_id},
        )
    return {"loan": my_loan(loan_id)}


@app.get(
    "/holds",
    operation_id="list_my_holds",
    tags=["holds"],
    summary="List my holds",
    response_description="holds: [{id, book_id, title, pickup_branch_name, status, created_at}]",
)
def list_my_holds():
    """The member's hold requests."""
    return {
        "holds": fetch_all(
            HOLD_SQL + " WHERE h.member_id = :mid ORDER BY h.id", mid=CURRENT_MEMBER_ID
        )
    }


@app.post(
    "/holds",
    operation_id="place_hold",
    tags=["holds"],
    summary="Place a hold on a book",
    response_description="hold: {id, book_id, title, pickup_branch_id, status, created_at}",
)
def place_hold(body: PlaceHoldRequest):
    """Reserve the next free copy of a book for pickup at a branch."""
    require_book(body.book_id)
    require_branch(body.pickup_branch_id)
    if fetch_one(
        "SELECT id FROM holds WHERE member_id = :mid AND book_id = :bid AND status = 'active'",
        mid=CURRENT_MEMBER_ID,
        bid=body.book_id,
    ):
        raise HTTPException(
            status_code=409, detail=f"You already have an active hold on book {body.book_id}"
        )
    stamp = now_iso()
    with engine.begin() as conn:
        result = conn.execute(
            text(
                "INSERT INTO holds (member_id, book_id, pickup_branch_id, status, created_at) "
                "VALUES (:mid, :bid, :brid, 'active', :ts)"
            ),
            {
                "mid": CURRENT_MEMBER_ID,
                "bid": body.book_id,
                "brid": body.pickup_branch_id,
                "ts": stamp,
            },
        )
    return {"hold": fetch_one(HOLD_SQL + " WHERE h.id = :hid", hid=result.lastrowid)}


@app.delete(
    "/holds/{hold_id}",
    operation_id="cancel_hold",
    tags=["holds"],
    summary="Cancel a hold",
    response_description="hold: {id, status: 'cancelled', ...}",
)
def cancel_hold(hold_id: int):
    """Cancel one of the member's active holds."""
    hold = fetch_one(
        HOLD_SQL + " WHERE h.id = :hid AND h.member_id = :mid", hid=hold_id, mid=CURRENT_MEMBER_ID
    )
    if hold is None:
        raise HTTPException(status_code=404, detail=f"Hold {hold_id} not found")
    if hold["status"] != "active":
        raise HTTPException(status_code=409, detail=f"Hold {hold_id} is {hold['status']}")
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE holds SET status = 'cancelled' WHERE id = :hid"), {"hid": hold_id}
        )
    return {"hold": fetch_one(HOLD_SQL + " WHERE h.id = :hid", hid=hold_id)}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
