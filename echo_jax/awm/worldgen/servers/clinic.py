"""Clinic appointment booking API: providers by specialty and location, open slots, bookings.

Every route's operation_id is the MCP tool name an agent calls; the signed-in patient is patient 1.
"""

import os
from datetime import date, timedelta

import uvicorn
from fastapi import FastAPI, HTTPException, Query
from pydantic import BaseModel, Field
from sqlalchemy import create_engine, text

DATABASE_URL = os.environ.get("DATABASE_PATH", "sqlite:///./clinic.db")
CURRENT_PATIENT_ID = 1

engine = create_engine(DATABASE_URL, connect_args={"check_same_thread": False})
app = FastAPI(title="Clinic Appointment Booking API", version="1.0.0")

APPOINTMENT_SQL = (
    "SELECT a.id, a.patient_id, a.provider_id, pr.full_name AS provider_name, pr.specialty, "
    "l.name AS location_name, a.slot_id, s.start_time, s.end_time, a.reason, a.status, "
    "a.created_at, a.updated_at FROM appointments a "
    "JOIN providers pr ON pr.id = a.provider_id JOIN locations l ON l.id = pr.location_id "
    "JOIN appointment_slots s ON s.id = a.slot_id"
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


def parse_date(value: str, name: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise HTTPException(
            status_code=400, detail=f"{name} must be a date in YYYY-MM-DD format, got '{value}'"
        ) from None


def provider_out(row: dict) -> dict:
    return {
        "id": row["id"],
        "full_name": row["full_name"],
        "specialty": row["specialty"],
        "location": {"id": row["location_id"], "name": row["location_name"]},
        "rating": row["rating"],
        "years_experience": row["years_experience"],
        "accepts_new_patients": bool(row["accepts_new_patients"]),
    }


def require_provider(provider_id: int) -> dict:
    row = fetch_one(
        "SELECT pr.*, l.name AS location_name FROM providers pr "
        "JOIN locations l ON l.id = pr.location_id WHERE pr.id = :pid",
        pid=provider_id,
    )
    if row is None:
        raise HTTPException(status_code=404, detail=f"Provider {provider_id} not found")
    return row


def require_slot(slot_id: int) -> dict:
    row = fetch_one("SELECT * FROM appointment_slots WHERE id = :sid", sid=slot_id)
    if row is None:
        raise HTTPException(status_code=404, detail=f"Appointment slot {slot_id} not found")
    if row["is_booked"]:
        raise HTTPException(status_code=409, detail=f"Slot {slot_id} is already booked")
    return row


def my_appointment(appointment_id: int) -> dict:
    row = fetch_one(
        APPOINTMENT_SQL + " WHERE a.id = :aid AND a.patient_id = :pid",
        aid=appointment_id,
        pid=CURRENT_PATIENT_ID,
    )
    if row is None:
        raise HTTPException(status_code=404, detail=f"Appointment {appointment_id} not found")
    return row


def require_scheduled(appointment: dict) -> None:
    if appointment["status"] != "scheduled":
        raise HTTPException(
            status_code=409,
            detail=f"Appointment {appointment['id']} is {appointment['status']}, not scheduled",
        )


class BookAppointmentRequest(BaseModel):
    slot_id: int = Field(..., description="ID of an open slot")
    reason: str = Field(..., min_length=3, max_length=200, description="Reason for the visit")


class CancelAppointmentRequest(BaseModel):
    reason: str | None = Field(None, max_length=200)


class RescheduleAppointmentRequest(BaseModel):
    new_slot_id: int = Field(..., description="ID of an open slot with the same provider")


@app.get(
    "/specialties",
    operation_id="list_specialties",
    tags=["providers"],
    summary="List medical specialties",
    response_description="specialties: [{specialty, provider_count}]",
)
def list_specialties():
    """Specialties offered by the clinic network, with how many providers practise each."""
    rows = fetch_all(
        "SELECT specialty, COUNT(*) AS provider_count FROM providers "
        "GROUP BY specialty ORDER BY specialty"
    )
    return {"specialties": rows}


@app.get(
    "/locations",
    operation_id="list_locations",
    tags=["providers"],
    summary="List clinic locations",
    response_description="locations: [{id, name, address, city}]",
)
def list_locations():
    """All clinic locations."""
    return {"locations": fetch_all("SELECT id, name, address, city FROM locations ORDER BY id")}


@app.get(
    "/providers/search",
    operation_id="search_providers",
    tags=["providers"],
    summary="Search providers",
    response_description="providers: [{id, full_name, specialty, location, rating, ...}], total",
)
def search_providers(
    specialty: str = Query(..., description="Specialty name, e.g. 'Cardiology'"),
    location_id: int | None = Query(None, description="Only providers at this location"),
    accepting_new_patients: bool | None = None,
):
    """Providers of a specialty, best rated first."""
    if location_id is not None and not fetch_one(
        "SELECT id FROM locations WHERE id = :lid", lid=location_id
    ):
        raise HTTPException(status_code=404, detail=f"Location {location_id} not found")
    rows = fetch_all(
        "SELECT pr.*, l.name AS location_name FROM providers pr "
        "JOIN locations l ON l.id = pr.location_id WHERE lower(pr.specialty) = lower(:sp) "
        "ORDER BY pr.rating DESC, pr.id ASC",
        sp=specialty.strip(),
    )
    if location_id is not None:
        rows = [r for r in rows if r["location_id"] == location_id]
    if accepting_new_patients is not None:
        rows = [r for r in rows if bool(r["accepts_new_patients"]) == accepting_new_patients]
    return {"providers": [provider_out(r) for r in rows], "total": len(rows)}


@app.get(
    "/providers/{provider_id}",
    operation_id="get_provider_by_id",
    tags=["providers"],
    summary="Get provider details",
    response_description="provider: {id, full_name, specialty, location, rating, ...}",
)
def get_provider_by_id(provider_id: int):
    """One provider's profile."""
    return {"provider": provider_out(require_provider(provider_id))}


@app.get(
    "/providers/{provider_id}/slots",
    operation_id="list_available_slots",
    tags=["scheduling"],
    summary="List a provider's open slots",
    response_description="provider_id, slots: [{id, start_time, end_time}]",
)
def list_available_slots(
    provider_id: int,
    start_date: str | None = Query(None, description="First day to include (YYYY-MM-DD)"),
    end_date: str | None = Query(None, description="Last day to include (YYYY-MM-DD)"),
    limit: int = Query(10, ge=1, le=50),
):
    """Unbooked slots of one provider in time order, optionally within a date range."""
    require_provider(provider_id)
    sql = "SELECT id, start_time, end_time FROM appointment_slots WHERE provider_id = :pid "
    sql += "AND is_booked = 0"
    params: dict = {"pid": provider_id}
    if start_date is not None:
        sql += " AND start_time >= :start"
        params["start"] = parse_date(start_date, "start_date").isoformat()
    if end_date is not None:
        sql += " AND start_time < :end"
        params["end"] = (parse_date(end_date, "end_date") + timedelta(days=1)).isoformat()
    rows = fetch_all(sql + " ORDER BY start_time, id", **params)
    return {"provider_id": provider_id, "slots": rows[:limit]}


@app.get(
    "/patients/me",
    operation_id="get_current_patient",
    tags=["patients"],
    summary="Get the signed-in patient",
    response_description="patient: {id, full_name, date_of_birth, email, phone, insurance}",
)
def get_current_patient():
    """Profile of the patient using the app."""
    row = fetch_one("SELECT * FROM patients WHERE id = :pid", pid=CURRENT_PATIENT_ID)
    return {"patient": row}


@app.get(
    "/appointments",
    operation_id="list_my_appointments",
    tags=["scheduling"],
    summary="List my appointments",
    response_description="appointments: [{id, provider_name, start_time, reason, status, ...}]",
)
def list_my_appointments(status: str | None = Query(None, description="scheduled/cancelled/...")):
    """The signed-in patient's appointments in time order."""
    sql = APPOINTMENT_SQL + " WHERE a.patient_id = :pid"
    params: dict = {"pid": CURRENT_PATIENT_ID}
    if status is not None:
        sql += " AND a.status = :status"
        params["status"] = status
    return {"appointments": fetch_all(sql + " ORDER BY s.start_time, a.id", **params)}


@app.post(
    "/appointments",
    operation_id="book_appointment",
    tags=["scheduling"],
    summary="Book an open slot",
    response_description="appointment: {id, provider_name, slot_id, start_time, status, ...}",
)
def book_appointment(body: BookAppointmentRequest):
    """Book one open slot for the signed-in patient."""
    slot = require_slot(body.slot_id)
    stamp = now_iso()
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE appointment_slots SET is_booked = 1 WHERE id = :sid"), {"sid": slot["id"]}
        )
        result = conn.execute(
            text(
                "INSERT INTO appointments (patient_id, provider_id, slot_id, reason, status, "
                "created_at, updated_at) VALUES (:pid, :prid, :sid, :reason, 'scheduled', :ts, :ts)"
            ),
            {
                "pid": CURRENT_PATIENT_ID,
                "prid": slot["provider_id"],
                "sid": slot["id"],
                "reason": body.reason.strip(),
                "ts": stamp,
            },
        )
    return {"appointment": my_appointment(result.lastrowid)}


@app.post(
    "/appointments/{appointment_id}/cancel",
    operation_id="cancel_appointment",
    tags=["scheduling"],
    summary="Cancel an appointment",
    response_description="appointment: {id, status: 'cancelled', ...}",
)
def cancel_appointment(appointment_id: int, body: CancelAppointmentRequest | None = None):
    """Cancel a scheduled appointment and release its slot."""
    appointment = my_appointment(appointment_id)
    require_scheduled(appointment)
    stamp = now_iso()
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE appointments SET status = 'cancelled', cancellation_reason = :reason, "
                "updated_at = :ts WHERE id = :aid"
            ),
            {"reason": body.reason if body else None, "ts": stamp, "aid": appointment_id},
        )
        conn.execute(
            text("UPDATE appointment_slots SET is_booked = 0 WHERE id = :sid"),
            {"sid": appointment["slot_id"]},
        )
    return {"appointment": my_appointment(appointment_id)}


@app.post(
    "/appointments/{appointment_id}/reschedule",
    operation_id="reschedule_appointment",
    tags=["scheduling"],
    summary="Move an appointment to another slot",
    response_description="appointment: {id, slot_id, start_time, status, ...}",
)
def reschedule_appointment(appointment_id: int, body: RescheduleAppointmentRequest):
    """Move a scheduled appointment to another open slot of the same provider."""
    appointment = my_appointment(appointment_id)
    require_scheduled(appointment)
    slot = require_slot(body.new_slot_id)
    if slot["provider_id"] != appointment["provider_id"]:
        raise HTTPException(status_code=400, detail="The new slot must be with the same provider")
    stamp = now_iso()
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE appointment_slots SET is_booked = 0 WHERE id = :sid"),
            {"sid": appointment["slot_id"]},
        )
        conn.execute(
            text("UPDATE appointment_slots SET is_booked = 1 WHERE id = :sid"), {"sid": slot["id"]}
        )
        conn.execute(
            text("UPDATE appointments SET slot_id = :sid, updated_at = :ts WHERE id = :aid"),
            {"sid": slot["id"], "ts": stamp, "aid": appointment_id},
        )
    return {"appointment": my_appointment(appointment_id)}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
