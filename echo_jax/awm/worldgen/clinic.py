"""Clinic worlds: providers by specialty and location, their open slots, the patient's bookings.

Tasks need the agent to compare provider ratings, read slot lists and find its own appointments
by provider and date before it can book, cancel or move anything.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta

import numpy as np

from .common import CLOCK_TABLE, ScenarioData, Table, Task, clock_rows, pick, sample, stamp

PREFIX = "clinic"
SERVER_FILE = "clinic.py"
PATIENT_ID = 1

LOCATIONS = (
    ("Downtown Clinic", "120 Main St", "Springfield"),
    ("Northside Medical Center", "4800 N Oak Ave", "Springfield"),
    ("Lakeview Health", "77 Shoreline Dr", "Lakeview"),
    ("Riverside Family Practice", "15 River Rd", "Riverside"),
    ("Westfield Care Center", "902 W Elm St", "Westfield"),
)
SPECIALTIES = (
    "Cardiology",
    "Dermatology",
    "Pediatrics",
    "Orthopedics",
    "Family Medicine",
    "Neurology",
    "Ophthalmology",
    "Endocrinology",
)
FIRST_NAMES = (
    "Amelia",
    "Rahul",
    "Grace",
    "Marcus",
    "Elena",
    "Daniel",
    "Priya",
    "Owen",
    "Sofia",
    "Hiro",
    "Naomi",
    "Victor",
    "Lena",
    "Samuel",
    "Ingrid",
    "Tomas",
    "Aisha",
    "Caleb",
)
LAST_NAMES = (
    "Patel",
    "Nguyen",
    "Okafor",
    "Schmidt",
    "Rossi",
    "Kim",
    "Alvarez",
    "Chen",
    "Haddad",
    "Larsen",
    "Moreau",
    "Silva",
    "Brennan",
    "Tanaka",
    "Fischer",
    "Osei",
    "Kowalski",
    "Reyes",
)
REASONS = (
    "annual checkup",
    "follow-up visit",
    "persistent headaches",
    "skin rash",
    "knee pain",
    "blood pressure review",
    "vision check",
    "lab results review",
    "back pain",
    "allergy symptoms",
)
SLOT_TIMES = tuple(time(h, m) for h in range(8, 17) for m in (0, 30))

TABLES = (
    Table(
        "patients",
        "CREATE TABLE patients (id INTEGER PRIMARY KEY, full_name TEXT NOT NULL, "
        "date_of_birth TEXT NOT NULL, email TEXT NOT NULL UNIQUE, phone TEXT NOT NULL, "
        "insurance_provider TEXT)",
    ),
    Table(
        "locations",
        "CREATE TABLE locations (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, "
        "address TEXT NOT NULL, city TEXT NOT NULL)",
    ),
    Table(
        "providers",
        "CREATE TABLE providers (id INTEGER PRIMARY KEY, full_name TEXT NOT NULL, "
        "specialty TEXT NOT NULL, location_id INTEGER NOT NULL REFERENCES locations(id), "
        "rating REAL NOT NULL, years_experience INTEGER NOT NULL, "
        "accepts_new_patients INTEGER NOT NULL DEFAULT 1)",
        ("CREATE INDEX idx_providers_specialty ON providers(specialty, location_id)",),
    ),
    Table(
        "appointment_slots",
        "CREATE TABLE appointment_slots (id INTEGER PRIMARY KEY, "
        "provider_id INTEGER NOT NULL REFERENCES providers(id), start_time TEXT NOT NULL, "
        "end_time TEXT NOT NULL, is_booked INTEGER NOT NULL DEFAULT 0)",
        ("CREATE INDEX idx_slots_provider_time ON appointment_slots(provider_id, start_time)",),
    ),
    Table(
        "appointments",
        "CREATE TABLE appointments (id INTEGER PRIMARY KEY, "
        "patient_id INTEGER NOT NULL REFERENCES patients(id), "
        "provider_id INTEGER NOT NULL REFERENCES providers(id), "
        "slot_id INTEGER NOT NULL REFERENCES appointment_slots(id), reason TEXT NOT NULL, "
        "status TEXT NOT NULL CHECK (status IN ('scheduled', 'cancelled', 'completed')), "
        "cancellation_reason TEXT, created_at TEXT NOT NULL, updated_at TEXT NOT NULL)",
        ("CREATE INDEX idx_appointments_patient ON appointments(patient_id, status)",),
    ),
    CLOCK_TABLE,
)

_STATE = """
def _state(db_path):
    rows = _query(
        db_path, "SELECT id, patient_id, provider_id, slot_id, status, reason FROM appointments"
    )
    appointments = {r[0]: r[1:] for r in rows}
    booked = {r[0] for r in _query(db_path, "SELECT id FROM appointment_slots WHERE is_booked = 1")}
    return appointments, booked

"""

VERIFIERS = {
    "book": _STATE
    + '''
def verify_task_completion(initial_db_path, final_db_path, final_answer=None):
    """One new scheduled appointment for the patient in an expected slot; nothing else moved."""
    try:
        (appts0, booked0), (appts1, booked1) = _state(initial_db_path), _state(final_db_path)
    except sqlite3.Error:
        return _result(False)
    new_ids = set(appts1) - set(appts0)
    if len(new_ids) != 1 or any(appts1.get(k) != v for k, v in appts0.items()):
        return _result(False)
    patient_id, _, slot_id, status, reason = appts1[new_ids.pop()]
    return _result(
        patient_id == 1
        and status == "scheduled"
        and slot_id in EXPECTED["slot_ids"]
        and EXPECTED["reason"].lower() in (reason or "").lower()
        and booked1 == booked0 | {slot_id}
    )
''',
    "cancel": _STATE
    + '''
def verify_task_completion(initial_db_path, final_db_path, final_answer=None):
    """The named appointment is cancelled and its slot released; nothing else changed."""
    try:
        (appts0, booked0), (appts1, booked1) = _state(initial_db_path), _state(final_db_path)
    except sqlite3.Error:
        return _result(False)
    target = EXPECTED["appointment_id"]
    if set(appts1) != set(appts0) or target not in appts0:
        return _result(False)
    others_same = all(appts1[k] == v for k, v in appts0.items() if k != target)
    patient_id, provider_id, slot_id, _, reason = appts0[target]
    return _result(
        others_same
        and appts1[target] == (patient_id, provider_id, slot_id, "cancelled", reason)
        and booked1 == booked0 - {slot_id}
    )
''',
    "reschedule": _STATE
    + '''
def verify_task_completion(initial_db_path, final_db_path, final_answer=None):
    """The appointment moved to the expected slot, the old slot is free, nothing else changed."""
    try:
        (appts0, booked0), (appts1, booked1) = _state(initial_db_path), _state(final_db_path)
    except sqlite3.Error:
        return _result(False)
    target, new_slot = EXPECTED["appointment_id"], EXPECTED["slot_id"]
    if set(appts1) != set(appts0) or target not in appts0:
        return _result(False)
    others_same = all(appts1[k] == v for k, v in appts0.items() if k != target)
    patient_id, provider_id, old_slot, status, reason = appts0[target]
    return _result(
        others_same
        and appts1[target] == (patient_id, provider_id, new_slot, status, reason)
        and booked1 == (booked0 - {old_slot}) | {new_slot}
    )
''',
}

TEMPLATE_VERIFIER = {
    "book_top_rated_at_location": "book",
    "book_earliest_any_provider": "book",
    "cancel_appointment": "cancel",
    "reschedule_first_open": "reschedule",
}


def _long_date(day: date) -> str:
    return f"{day:%B} {day.day}, {day.year}"


def _slot_day(slot: dict) -> date:
    return date.fromisoformat(slot["start_time"][:10])


def _open_slots(slots: list[dict], provider_id: int, start: date, end: date | None = None) -> list:
    found = [
        s
        for s in slots
        if s["provider_id"] == provider_id
        and not s["is_booked"]
        and _slot_day(s) >= start
        and (end is None or _slot_day(s) <= end)
    ]
    return sorted(found, key=lambda s: (s["start_time"], s["id"]))


def _build_schedule(rng: np.random.Generator, providers: list[dict], first_day: date) -> list:
    """Two weeks of 30-minute slots; each provider works a few weekdays."""
    slots = []
    weekdays = [
        first_day + timedelta(days=d)
        for d in range(14)
        if (first_day + timedelta(days=d)).weekday() < 5
    ]
    for provider in providers:
        for day in sorted(sample(rng, weekdays, int(rng.integers(4, 7)))):
            for slot_time in sorted(sample(rng, SLOT_TIMES, int(rng.integers(2, 4)))):
                start = datetime.combine(day, slot_time)
                slots.append(
                    {
                        "id": len(slots) + 1,
                        "provider_id": provider["id"],
                        "start_time": start.isoformat(timespec="seconds"),
                        "end_time": (start + timedelta(minutes=30)).isoformat(timespec="seconds"),
                        "is_booked": bool(rng.random() < 0.35),
                    }
                )
    return slots


def build(name: str, rng: np.random.Generator) -> ScenarioData:
    """One clinic scenario: providers, two weeks of slots, the patient's bookings, ten tasks."""
    first_day = date(2026, 3, 2) + timedelta(weeks=int(rng.integers(0, 20)))
    created = datetime(2026, 1, 5, 8, 0, 0)
    locations = [
        {"id": i + 1, "name": n, "address": a, "city": c}
        for i, (n, a, c) in enumerate(sample(rng, LOCATIONS, 3))
    ]
    specialties = sample(rng, SPECIALTIES, 4)
    names = iter(sample(rng, [(f, la) for f in FIRST_NAMES for la in LAST_NAMES], 40))
    providers = []
    for specialty in specialties:
        ratings = sample(rng, range(35, 50), 4)
        home = pick(rng, locations)["id"]
        for k in range(int(rng.integers(3, 5))):
            first, last = next(names)
            providers.append(
                {
                    "id": len(providers) + 1,
                    "full_name": f"Dr. {first} {last}",
                    "specialty": specialty,
                    "location_id": home if k < 2 else pick(rng, locations)["id"],
                    "rating": ratings[k] / 10,
                    "years_experience": int(rng.integers(3, 31)),
                    "accepts_new_patients": bool(rng.random() < 0.8),
                }
            )
    slots = _build_schedule(rng, providers, first_day)
    patients = [
        {
            "id": 1,
            "full_name": "Jamie Rivera",
            "date_of_birth": "1988-04-17",
            "email": "jamie.rivera@example.com",
            "phone": "555-0142",
            "insurance_provider": "BlueShield",
        },
    ]
    for pid in range(2, 7):
        first, last = next(names)
        patients.append(
            {
                "id": pid,
                "full_name": f"{first} {last}",
                "date_of_birth": (
                    date(1950, 1, 1) + timedelta(days=int(rng.integers(18000)))
                ).isoformat(),
                "email": f"{first.lower()}.{last.lower()}@example.com",
                "phone": f"555-01{pid:02d}",
                "insurance_provider": pick(rng, ("Aetna", "Cigna", "BlueShield", None)),
            }
        )
    appointments = []
    mine = sample(rng, sorted({p["id"] for p in providers}), 4)
    for slot in slots:
        if not slot["is_booked"]:
            continue
        patient = 1 if slot["provider_id"] in mine else int(rng.integers(2, 7))
        if patient == 1:
            mine.remove(slot["provider_id"])
        appointments.append(
            {
                "id": len(appointments) + 1,
                "patient_id": patient,
                "provider_id": slot["provider_id"],
                "slot_id": slot["id"],
                "reason": pick(rng, REASONS),
                "status": "scheduled",
                "cancellation_reason": None,
                "created_at": stamp(created, rng, 40),
                "updated_at": stamp(created, rng, 40),
            }
        )
    freed = pick(rng, [s for s in slots if not s["is_booked"]])
    appointments.append(
        {
            "id": len(appointments) + 1,
            "patient_id": 1,
            "provider_id": freed["provider_id"],
            "slot_id": freed["id"],
            "reason": pick(rng, REASONS),
            "status": "cancelled",
            "cancellation_reason": "schedule conflict",
            "created_at": stamp(created, rng, 40),
            "updated_at": stamp(created, rng, 40),
        }
    )
    by_id = {p["id"]: p for p in providers}
    slot_by_id = {s["id"]: s for s in slots}
    location_name = {loc["id"]: loc["name"] for loc in locations}
    my_appts = [a for a in appointments if a["patient_id"] == 1 and a["status"] == "scheduled"]
    if len(my_appts) < 3:
        raise ValueError("the patient needs at least three scheduled appointments")

    book_top = []
    for specialty in sample(rng, specialties, len(specialties)):
        for loc in sample(rng, locations, len(locations)):
            here = sorted(
                (
                    p
                    for p in providers
                    if p["specialty"] == specialty and p["location_id"] == loc["id"]
                ),
                key=lambda p: -p["rating"],
            )
            if len(here) < 2:
                continue
            day = first_day + timedelta(days=int(rng.integers(0, 7)))
            top_open, second_open = (_open_slots(slots, p["id"], day) for p in here[:2])
            if not top_open or not second_open:
                continue
            reason = pick(rng, REASONS)
            book_top.append(
                Task(
                    text=(
                        f"Book an appointment with the highest-rated {specialty} provider at "
                        f"{loc['name']}, in their earliest open slot on or after "
                        f"{_long_date(day)}. The reason for the visit is '{reason}'."
                    ),
                    template="book_top_rated_at_location",
                    params={
                        "specialty": specialty,
                        "location": loc["name"],
                        "date": day.isoformat(),
                        "reason": reason,
                    },
                    expected={"slot_ids": [top_open[0]["id"]], "reason": reason},
                )
            )
    book_any = []
    for specialty in sample(rng, specialties, len(specialties)):
        start = first_day + timedelta(days=int(rng.integers(0, 8)))
        end = start + timedelta(days=int(rng.integers(2, 5)))
        firsts = [
            s[0]
            for p in providers
            if p["specialty"] == specialty
            if (s := _open_slots(slots, p["id"], start, end))
        ]
        if len(firsts) < 2:
            continue
        earliest = min(s["start_time"] for s in firsts)
        reason = pick(rng, REASONS)
        book_any.append(
            Task(
                text=(
                    f"Book the earliest open {specialty} appointment with any provider between "
                    f"{_long_date(start)} and {_long_date(end)} (inclusive). Reason: '{reason}'."
                ),
                template="book_earliest_any_provider",
                params={
                    "specialty": specialty,
                    "start_date": start.isoformat(),
                    "end_date": end.isoformat(),
                    "reason": reason,
                },
                expected={
                    "slot_ids": [s["id"] for s in firsts if s["start_time"] == earliest],
                    "reason": reason,
                },
            )
        )
    cancels, moves = [], []
    for appt in sample(rng, my_appts, len(my_appts)):
        provider = by_id[appt["provider_id"]]
        day = _slot_day(slot_by_id[appt["slot_id"]])
        cancels.append(
            Task(
                text=f"Cancel my appointment with {provider['full_name']} on {_long_date(day)}.",
                template="cancel_appointment",
                params={"provider_name": provider["full_name"], "date": day.isoformat()},
                expected={"appointment_id": appt["id"]},
            )
        )
        new_day = first_day + timedelta(days=int(rng.integers(0, 12)))
        open_after = _open_slots(slots, provider["id"], new_day)
        if open_after:
            moves.append(
                Task(
                    text=(
                        f"Move my {_long_date(day)} appointment with {provider['full_name']} "
                        f"({location_name[provider['location_id']]}) "
                        f"to that provider's first open slot on or after {_long_date(new_day)}."
                    ),
                    template="reschedule_first_open",
                    params={
                        "provider_name": provider["full_name"],
                        "date": day.isoformat(),
                        "new_date": new_day.isoformat(),
                    },
                    expected={"appointment_id": appt["id"], "slot_id": open_after[0]["id"]},
                )
            )
    if len(book_top) < 3 or len(book_any) < 2 or len(cancels) < 2 or len(moves) < 3:
        raise ValueError("scenario draw cannot support every task template")
    tasks = [
        book_top[0],
        cancels[0],
        moves[0],
        book_any[0],
        book_top[1],
        cancels[1],
        moves[1],
        book_any[1],
        book_top[2],
        moves[2],
    ]
    rows = {
        "patients": patients,
        "locations": locations,
        "providers": providers,
        "appointment_slots": slots,
        "appointments": appointments,
        # The Friday before the schedule opens: after every created_at/updated_at (at most
        # `created` + 41 days), before every slot.
        "world_clock": clock_rows(datetime.combine(first_day - timedelta(days=3), time(8, 0))),
    }
    description = (
        "A clinic network's patient portal: the signed-in patient searches providers in "
        f"{', '.join(specialties)} across {', '.join(location_name.values())}, compares ratings, "
        f"reads open appointment slots for the two weeks from {_long_date(first_day)}, and books, "
        "cancels or reschedules visits."
    )
    return ScenarioData(name=name, description=description, rows=rows, tasks=tasks)
