"""Library worlds: a catalogue spread over branches, the member's loans, renewals and holds.

Tasks need the agent to rank books, check shelf availability per branch, and find its own loans by
title or due date before it checks out, renews, returns or reserves anything.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta

import numpy as np

from .common import CLOCK_TABLE, ScenarioData, Table, Task, clock_rows, pick, sample, stamp

PREFIX = "library"
SERVER_FILE = "library.py"
MEMBER_ID = 1

BRANCHES = (
    ("Central Branch", "1 Library Plaza", "Mon-Sat 9:00-20:00"),
    ("Eastside Branch", "410 E 5th St", "Mon-Fri 10:00-18:00"),
    ("Maple Grove Branch", "88 Maple Ave", "Tue-Sat 10:00-17:00"),
    ("Oak Park Branch", "2300 Oak Park Blvd", "Mon-Sat 9:00-18:00"),
    ("Hillcrest Branch", "7 Summit Rd", "Wed-Sun 11:00-19:00"),
)
GENRES = (
    "Mystery",
    "Science Fiction",
    "Fantasy",
    "History",
    "Biography",
    "Romance",
    "Thriller",
    "Poetry",
)
ADJECTIVES = (
    "Silent",
    "Hidden",
    "Broken",
    "Golden",
    "Last",
    "Distant",
    "Crimson",
    "Forgotten",
    "Winter",
    "Hollow",
    "Burning",
    "Quiet",
    "Iron",
    "Paper",
    "Midnight",
    "Salt",
)
NOUNS = (
    "River",
    "Garden",
    "Archive",
    "Harbor",
    "Orchard",
    "Lighthouse",
    "Cartographer",
    "Season",
    "Kingdom",
    "Letters",
    "Tide",
    "Bridge",
    "Atlas",
    "Engine",
    "Choir",
    "Meridian",
)
AUTHORS_FIRST = ("Ada", "Ben", "Clara", "Dev", "Esme", "Farah", "Gus", "Hana", "Ivo", "June")
AUTHORS_LAST = ("Whitlock", "Marsh", "Okonkwo", "Lindqvist", "Duarte", "Sato", "Price", "Vance")

TABLES = (
    Table(
        "branches",
        "CREATE TABLE branches (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, "
        "address TEXT NOT NULL, opening_hours TEXT NOT NULL)",
    ),
    Table(
        "members",
        "CREATE TABLE members (id INTEGER PRIMARY KEY, full_name TEXT NOT NULL, "
        "card_number TEXT NOT NULL UNIQUE, email TEXT NOT NULL, "
        "max_loans INTEGER NOT NULL DEFAULT 8, outstanding_fines REAL NOT NULL DEFAULT 0)",
    ),
    Table(
        "books",
        "CREATE TABLE books (id INTEGER PRIMARY KEY, title TEXT NOT NULL, author TEXT NOT NULL, "
        "genre TEXT NOT NULL, published_year INTEGER NOT NULL, isbn TEXT NOT NULL UNIQUE, "
        "average_rating REAL NOT NULL, ratings_count INTEGER NOT NULL)",
        ("CREATE INDEX idx_books_genre ON books(genre)",),
    ),
    Table(
        "copies",
        "CREATE TABLE copies (id INTEGER PRIMARY KEY, "
        "book_id INTEGER NOT NULL REFERENCES books(id), "
        "branch_id INTEGER NOT NULL REFERENCES branches(id), barcode TEXT NOT NULL UNIQUE, "
        "status TEXT NOT NULL CHECK (status IN ('available', 'on_loan', 'on_hold_shelf')), "
        "condition TEXT NOT NULL)",
        ("CREATE INDEX idx_copies_book_branch ON copies(book_id, branch_id)",),
    ),
    Table(
        "loans",
        "CREATE TABLE loans (id INTEGER PRIMARY KEY, "
        "member_id INTEGER NOT NULL REFERENCES members(id), "
        "copy_id INTEGER NOT NULL REFERENCES copies(id), checked_out_at TEXT NOT NULL, "
        "due_date TEXT NOT NULL, returned_at TEXT, renewal_count INTEGER NOT NULL DEFAULT 0, "
        "status TEXT NOT NULL CHECK (status IN ('active', 'returned')))",
        ("CREATE INDEX idx_loans_member ON loans(member_id, status)",),
    ),
    Table(
        "holds",
        "CREATE TABLE holds (id INTEGER PRIMARY KEY, "
        "member_id INTEGER NOT NULL REFERENCES members(id), "
        "book_id INTEGER NOT NULL REFERENCES books(id), "
        "pickup_branch_id INTEGER NOT NULL REFERENCES branches(id), "
        "status TEXT NOT NULL CHECK (status IN ('active', 'fulfilled', 'cancelled')), "
        "created_at TEXT NOT NULL)",
    ),
    CLOCK_TABLE,
)

_LOANS = """
def _loans(db_path):
    rows = _query(
        db_path,
        "SELECT id, member_id, copy_id, status, due_date, renewal_count, returned_at FROM loans",
    )
    return {r[0]: r[1:] for r in rows}


def _copies(db_path):
    return dict(_query(db_path, "SELECT id, status FROM copies"))

"""

VERIFIERS = {
    "checkout": _LOANS
    + '''
def verify_task_completion(initial_db_path, final_db_path, final_answer=None):
    """One new active loan of an expected copy; only that copy changed status."""
    try:
        loans0, loans1 = _loans(initial_db_path), _loans(final_db_path)
        copies0, copies1 = _copies(initial_db_path), _copies(final_db_path)
    except sqlite3.Error:
        return _result(False)
    new_ids = set(loans1) - set(loans0)
    if len(new_ids) != 1 or any(loans1.get(k) != v for k, v in loans0.items()):
        return _result(False)
    member_id, copy_id, status = loans1[new_ids.pop()][:3]
    expected_copies = dict(copies0)
    expected_copies[copy_id] = "on_loan"
    return _result(
        member_id == 1
        and status == "active"
        and copy_id in EXPECTED["copy_ids"]
        and copies1 == expected_copies
    )
''',
    "renew": _LOANS
    + '''
def verify_task_completion(initial_db_path, final_db_path, final_answer=None):
    """Exactly the loans due by the cutoff were renewed once each; the rest are untouched."""
    try:
        loans0, loans1 = _loans(initial_db_path), _loans(final_db_path)
    except sqlite3.Error:
        return _result(False)
    if set(loans1) != set(loans0):
        return _result(False)
    for loan_id, (member_id, copy_id, status, due, renewals, returned) in loans0.items():
        if loan_id not in EXPECTED["loan_ids"]:
            if loans1[loan_id] != loans0[loan_id]:
                return _result(False)
            continue
        m1, c1, s1, due1, renewals1, returned1 = loans1[loan_id]
        same = (m1, c1, s1, returned1) == (member_id, copy_id, status, returned)
        if not (same and renewals1 == renewals + 1 and due1 > due):
            return _result(False)
    return _result(True)
''',
    "return": _LOANS
    + '''
def verify_task_completion(initial_db_path, final_db_path, final_answer=None):
    """The named loan is returned and its copy is back on the shelf; nothing else changed."""
    try:
        loans0, loans1 = _loans(initial_db_path), _loans(final_db_path)
        copies0, copies1 = _copies(initial_db_path), _copies(final_db_path)
    except sqlite3.Error:
        return _result(False)
    target = EXPECTED["loan_id"]
    if set(loans1) != set(loans0) or target not in loans0:
        return _result(False)
    if any(loans1[k] != v for k, v in loans0.items() if k != target):
        return _result(False)
    member_id, copy_id, _, due, renewals, _ = loans0[target]
    expected_copies = dict(copies0)
    expected_copies[copy_id] = "available"
    status, returned = loans1[target][2], loans1[target][5]
    return _result(
        member_id == 1
        and status == "returned"
        and returned is not None
        and loans1[target][:2] + loans1[target][3:5] == (member_id, copy_id, due, renewals)
        and copies1 == expected_copies
    )
''',
    "hold": '''
def _holds(db_path):
    rows = _query(db_path, "SELECT id, member_id, book_id, pickup_branch_id, status FROM holds")
    return {r[0]: r[1:] for r in rows}


def verify_task_completion(initial_db_path, final_db_path, final_answer=None):
    """One new active hold on the book for pickup at the branch; existing holds unchanged."""
    try:
        holds0, holds1 = _holds(initial_db_path), _holds(final_db_path)
    except sqlite3.Error:
        return _result(False)
    new_ids = set(holds1) - set(holds0)
    if len(new_ids) != 1 or any(holds1.get(k) != v for k, v in holds0.items()):
        return _result(False)
    expected = (1, EXPECTED["book_id"], EXPECTED["branch_id"], "active")
    return _result(holds1[new_ids.pop()] == expected)
''',
}

TEMPLATE_VERIFIER = {
    "checkout_top_rated_available": "checkout",
    "renew_due_by": "renew",
    "return_book": "return",
    "place_hold": "hold",
}


def _long_date(day: date) -> str:
    return f"{day:%B} {day.day}, {day.year}"


def _build_books(rng: np.random.Generator, genres: list[str]) -> list[dict]:
    titles = [f"The {a} {n}" for a in ADJECTIVES for n in NOUNS]
    titles += [
        f"{n} of the {a} {m}" for a, n, m in zip(ADJECTIVES, NOUNS, NOUNS[::-1], strict=True)
    ]
    books = []
    chosen = iter(sample(rng, titles, 6 * len(genres)))
    for genre in genres:
        ratings = sample(rng, range(30, 50), 6)
        for k in range(int(rng.integers(5, 7))):
            bid = len(books) + 1
            books.append(
                {
                    "id": bid,
                    "title": next(chosen),
                    "author": f"{pick(rng, AUTHORS_FIRST)} {pick(rng, AUTHORS_LAST)}",
                    "genre": genre,
                    "published_year": int(rng.integers(1960, 2025)),
                    "isbn": f"978{int(rng.integers(10**9, 10**10 - 1))}",
                    "average_rating": ratings[k] / 10,
                    "ratings_count": int(rng.integers(15, 4000)),
                }
            )
    return books


def _build_copies(rng: np.random.Generator, books: list[dict], branches: list[dict]) -> list:
    copies = []
    for book in books:
        for _ in range(int(rng.integers(1, 5))):
            cid = len(copies) + 1
            status = pick(rng, ("available",) * 5 + ("on_loan",) * 4 + ("on_hold_shelf",))
            copies.append(
                {
                    "id": cid,
                    "book_id": book["id"],
                    "branch_id": pick(rng, branches)["id"],
                    "barcode": f"31{book['id']:03d}{cid:05d}",
                    "status": status,
                    "condition": pick(rng, ("good", "good", "fair", "new")),
                }
            )
    return copies


def build(name: str, rng: np.random.Generator) -> ScenarioData:
    """One library scenario: catalogue, copies per branch, loans and holds, ten tasks."""
    today = date(2026, 3, 2) + timedelta(days=int(rng.integers(0, 120)))
    opened = datetime.combine(today - timedelta(days=40), datetime.min.time())
    branches = [
        {"id": i + 1, "name": n, "address": a, "opening_hours": h}
        for i, (n, a, h) in enumerate(sample(rng, BRANCHES, 3))
    ]
    genres = sample(rng, GENRES, 5)
    books = _build_books(rng, genres)
    copies = _build_copies(rng, books, branches)
    members = [
        {
            "id": 1,
            "full_name": "Morgan Ellis",
            "card_number": "LIB-000001",
            "email": "morgan.ellis@example.com",
            "max_loans": 8,
            "outstanding_fines": 0.0,
        },
    ]
    for mid in range(2, 6):
        members.append(
            {
                "id": mid,
                "full_name": f"{pick(rng, AUTHORS_FIRST)} {pick(rng, AUTHORS_LAST)}",
                "card_number": f"LIB-{mid:06d}",
                "email": f"member{mid}@example.com",
                "max_loans": 8,
                "outstanding_fines": round(float(rng.integers(0, 4)) * 0.25, 2),
            }
        )
    on_loan = [c for c in copies if c["status"] == "on_loan"]
    mine_books: dict[
        int, int
    ] = {}  # book_id -> copy_id: one copy per title, so titles identify loans
    for copy in sample(rng, on_loan, len(on_loan)):
        if len(mine_books) < 5:
            mine_books.setdefault(copy["book_id"], copy["id"])
    mine_ids = set(mine_books.values())
    loans = []
    for copy in on_loan:
        due = today + timedelta(days=int(rng.integers(-2, 20)))
        renewals = int(rng.integers(0, 2)) if copy["id"] in mine_ids else int(rng.integers(0, 3))
        loans.append(
            {
                "id": len(loans) + 1,
                "member_id": 1 if copy["id"] in mine_ids else int(rng.integers(2, 6)),
                "copy_id": copy["id"],
                "checked_out_at": (due - timedelta(days=21 + 14 * renewals)).isoformat()
                + "T10:15:00",
                "due_date": due.isoformat(),
                "returned_at": None,
                "renewal_count": renewals,
                "status": "active",
            }
        )
    for copy in sample(rng, [c for c in copies if c["status"] == "available"], 2):
        out = today - timedelta(days=int(rng.integers(30, 60)))
        loans.append(
            {
                "id": len(loans) + 1,
                "member_id": 1,
                "copy_id": copy["id"],
                "checked_out_at": out.isoformat() + "T14:00:00",
                "due_date": (out + timedelta(days=21)).isoformat(),
                "returned_at": (out + timedelta(days=15)).isoformat() + "T12:30:00",
                "renewal_count": 0,
                "status": "returned",
            }
        )
    held = pick(rng, books)
    holds = [
        {
            "id": 1,
            "member_id": 1,
            "book_id": held["id"],
            "pickup_branch_id": branches[0]["id"],
            "status": "active",
            "created_at": stamp(opened, rng, 30),
        },
        {
            "id": 2,
            "member_id": 3,
            "book_id": pick(rng, books)["id"],
            "pickup_branch_id": branches[1]["id"],
            "status": "active",
            "created_at": stamp(opened, rng, 30),
        },
    ]
    my_loans = [ln for ln in loans if ln["member_id"] == 1 and ln["status"] == "active"]
    if len(my_loans) < 4:
        raise ValueError("the member needs at least four active loans")
    book_by_id = {b["id"]: b for b in books}
    copy_by_id = {c["id"]: c for c in copies}

    def available_at(book: dict, branch: dict) -> list[int]:
        return [
            c["id"]
            for c in copies
            if c["book_id"] == book["id"]
            and c["branch_id"] == branch["id"]
            and c["status"] == "available"
        ]

    checkouts = []
    for genre in sample(rng, genres, len(genres)):
        year = int(pick(rng, (1970, 1980, 1990, 2000)))
        ranked = sorted(
            (b for b in books if b["genre"] == genre and b["published_year"] > year),
            key=lambda b: (-b["average_rating"], -b["ratings_count"], b["id"]),
        )
        options = []
        for branch in branches:
            fitting = [b for b in ranked if available_at(b, branch)]
            if len(fitting) >= 2:
                options.append((fitting[0] is not ranked[0], branch, fitting[0]))
        if not options:
            continue
        _, branch, book = pick(rng, [o for o in options if o[0]] or options)
        checkouts.append(
            Task(
                text=(
                    f"Check out a copy of the highest-rated {genre} book published after {year} "
                    f"that has a copy on the shelf at the {branch['name']}."
                ),
                template="checkout_top_rated_available",
                params={"genre": genre, "year": year, "branch": branch["name"]},
                expected={"copy_ids": available_at(book, branch)},
            )
        )
    renewals = []
    dues = sorted({ln["due_date"] for ln in my_loans})
    for cutoff in sample(rng, dues[:-1], len(dues) - 1):
        targets = [ln["id"] for ln in my_loans if ln["due_date"] <= cutoff]
        if 1 <= len(targets) <= 3:
            renewals.append(
                Task(
                    text=(
                        "Renew every loan of mine that is due on or before "
                        f"{_long_date(date.fromisoformat(cutoff))}."
                    ),
                    template="renew_due_by",
                    params={"date": cutoff},
                    expected={"loan_ids": targets},
                )
            )
    returns = []
    for loan in sample(rng, my_loans, len(my_loans)):
        title = book_by_id[copy_by_id[loan["copy_id"]]["book_id"]]["title"]
        returns.append(
            Task(
                text=f"I finished '{title}'. Please return it.",
                template="return_book",
                params={"title": title},
                expected={"loan_id": loan["id"]},
            )
        )
    hold_tasks = []
    borrowed = {copy_by_id[ln["copy_id"]]["book_id"] for ln in my_loans} | {held["id"]}
    for book in sample(rng, [b for b in books if b["id"] not in borrowed], 2):
        branch = pick(rng, branches)
        hold_tasks.append(
            Task(
                text=f"Place a hold on '{book['title']}' for pickup at the {branch['name']}.",
                template="place_hold",
                params={"title": book["title"], "branch": branch["name"]},
                expected={"book_id": book["id"], "branch_id": branch["id"]},
            )
        )
    if len(checkouts) < 3 or len(renewals) < 2 or len(returns) < 3:
        raise ValueError("scenario draw cannot support every task template")
    tasks = [
        checkouts[0],
        renewals[0],
        returns[0],
        hold_tasks[0],
        checkouts[1],
        renewals[1],
        returns[1],
        hold_tasks[1],
        checkouts[2],
        returns[2],
    ]
    rows = {
        "branches": branches,
        "members": members,
        "books": books,
        "copies": copies,
        "loans": loans,
        "holds": holds,
        # Noon of `today`: after every stamp above; new loans fall due LOAN_DAYS after it.
        "world_clock": clock_rows(datetime.combine(today, time(12, 0))),
    }
    description = (
        "A public library's member portal: the signed-in member searches a catalogue of "
        f"{', '.join(g.lower() for g in genres)} titles held at the "
        f"{', '.join(b['name'] for b in branches)}, "
        "checks which copies are on the shelf, and manages loans, renewals and holds."
    )
    return ScenarioData(name=name, description=description, rows=rows, tasks=tasks)
