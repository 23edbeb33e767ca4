"""Shared building blocks of the world generator: records, SQL literals, API specs, verifiers.

The output follows AgentWorldModel-1K (arXiv 2602.10090) file by file, so any AWM loader can read
our worlds; domain modules only supply data, task texts and verifier bodies.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

SERVERS_DIR = Path(__file__).parent / "servers"


@dataclass(frozen=True)
class Table:
    """One table of a scenario's database: CREATE TABLE text plus CREATE INDEX statements."""

    name: str
    ddl: str
    indexes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Task:
    """A task as the user states it, the parameters a policy may read, and the hidden answer."""

    text: str
    template: str
    params: dict[str, Any]
    expected: dict[str, Any]


@dataclass(frozen=True)
class ScenarioData:
    """Everything a domain generates for one scenario; code and schema are shared per domain."""

    name: str
    description: str
    rows: dict[str, list[dict[str, Any]]]
    tasks: list[Task] = field(default_factory=list)


CLOCK_TABLE = Table(
    "world_clock",
    "CREATE TABLE world_clock (id INTEGER PRIMARY KEY CHECK (id = 1), now TEXT NOT NULL)",
)
"""The scenario's "current time": servers stamp writes and date loans from it, never the wall
clock, so replaying the same actions on a fresh database gives byte-identical tool results."""


def clock_rows(now: datetime) -> list[dict[str, Any]]:
    """The single world_clock row, in the same `YYYY-MM-DDTHH:MM:SS` form as every stamp."""
    return [{"id": 1, "now": now.isoformat(timespec="seconds")}]


def normalize_name(raw: str) -> str:
    """AWM keys scenarios by lowercase `[a-z0-9_]` names."""
    return re.sub(r"_+", "_", re.sub(r"[^a-z0-9]+", "_", raw.lower())).strip("_")


def pick(rng: np.random.Generator, items: Sequence[T]) -> T:
    """One element of a sequence (np.random.choice would turn tuples into arrays)."""
    return items[int(rng.integers(len(items)))]


def sample(rng: np.random.Generator, items: Sequence[T], k: int) -> list[T]:
    """k distinct elements in random order."""
    return [items[int(i)] for i in rng.permutation(len(items))[:k]]


def stamp(base: datetime, rng: np.random.Generator, max_days: int) -> str:
    """A timestamp up to max_days after base, in the capture's `YYYY-MM-DDTHH:MM:SS` form."""
    offset = timedelta(days=int(rng.integers(max_days + 1)), seconds=int(rng.integers(86400)))
    return (base + offset).isoformat(timespec="seconds")


def sql_literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int | float):
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"


def insert_statement(table: str, row: dict[str, Any]) -> str:
    columns = ", ".join(row)
    values = ", ".join(sql_literal(v) for v in row.values())
    return f"INSERT INTO {table} ({columns}) VALUES ({values});"


def server_code(file_name: str) -> str:
    """The complete FastAPI server of a domain, as stored in gen_envs.jsonl; like a real AWM-1K
    full_code it does not mount MCP (echo_jax.awm.launcher does, as AWM's launcher does)."""
    return (SERVERS_DIR / file_name).read_text(encoding="utf-8")


def _json_type(schema: dict[str, Any]) -> str:
    for option in schema.get("anyOf", [schema]):
        if option.get("type", "null") != "null":
            return option["type"]
    return "string"


def _param_entry(schema: dict[str, Any], where: str, required: bool, description: str) -> dict:
    entry: dict[str, Any] = {"type": _json_type(schema), "param_type": where, "required": required}
    if description:
        entry["description"] = description
    enum = next((o["enum"] for o in schema.get("anyOf", [schema]) if "enum" in o), None)
    if enum:
        entry["enum"] = enum
    if "default" in schema and schema["default"] is not None:
        entry["default"] = schema["default"]
    return entry


def _body_params(operation: dict, components: dict) -> dict[str, dict]:
    content = operation.get("requestBody", {}).get("content", {}).get("application/json", {})
    schema = content.get("schema", {})
    ref = next((o["$ref"] for o in schema.get("anyOf", [schema]) if "$ref" in o), None)
    if ref is None:
        return {}
    model = components[ref.rsplit("/", 1)[-1]]
    required = set(model.get("required", []))
    return {
        name: _param_entry(prop, "body", name in required, prop.get("description", ""))
        for name, prop in model.get("properties", {}).items()
    }


def api_spec_from_code(full_code: str) -> dict[str, Any]:
    """Derive the gen_spec `api_spec` from the server's own OpenAPI so spec and code cannot drift.

    The server code only builds its SQLAlchemy engine lazily, so exec'ing it opens no database.
    """
    namespace: dict[str, Any] = {"__name__": "awm_world_server"}
    exec(compile(full_code, "<awm_world_server>", "exec"), namespace)
    openapi = namespace["app"].openapi()
    components = openapi.get("components", {}).get("schemas", {})
    groups: dict[str, list[dict]] = {}
    for path, operations in openapi["paths"].items():
        if path.startswith("/mcp"):
            continue
        for method, op in operations.items():
            params = {
                p["name"]: _param_entry(
                    p.get("schema", {}), p["in"], p.get("required", False), p.get("description", "")
                )
                for p in op.get("parameters", [])
            }
            params.update(_body_params(op, components))
            groups.setdefault(op["tags"][0], []).append(
                {
                    "path": path,
                    "method": method.upper(),
                    "summary": op["summary"],
                    "description": op.get("description", op["summary"]),
                    "operation_id": op["operationId"],
                    "request_params": params,
                    "response": {
                        "status_code": 200,
                        "description": op["responses"]["200"]["description"],
                    },
                }
            )
    return {"api_groups": [{"group_name": g, "endpoints": eps} for g, eps in groups.items()]}


VERIFIER_PRELUDE = '''import json
import sqlite3


def _query(db_path, sql, args=()):
    """Rows of a read-only query; the verifier never writes to either database."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def _result(ok):
    return {"result": "complete" if ok else "others"}

'''


def verifier_code(body: str, expected: dict[str, Any]) -> str:
    """Self-contained verifier source: stdlib sqlite3/json only, answer baked in as EXPECTED."""
    constants = f"EXPECTED = json.loads({json.dumps(json.dumps(expected, sort_keys=True))})\n"
    return VERIFIER_PRELUDE + constants + body


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def replace_dir(tmp_dir: Path, out_dir: Path) -> None:
    """Swap a fully written temp folder into place so readers never see a half-written world."""
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp_dir, out_dir)
    shutil.rmtree(old, ignore_errors=True)
