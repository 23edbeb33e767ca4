"""Load and validate worlds stored in the AgentWorldModel-1K (AWM) folder format.

A world folder holds one JSON record per line and scenario in each of seven files (see
`WORLD_FILES`). Every record is checked when loaded, so that a broken world fails here with the
file, line and key at fault instead of as an obscure server or verifier crash mid-capture. Files
are streamed line by line: the real AWM-1K files hold 1,000 scenarios and full server sources.
Unknown files in the folder (e.g. our own `echo_task_params.jsonl`) are ignored, and so is
AWM-1K's `gen_verifier.jsonl`: its verifiers feed AWM's code-augmented LLM judge, while episodes
here are scored by the pure-code verifiers of `gen_verifier.pure_code.jsonl`. AWM-1K's verifier
files repeat some (scenario, task_idx) records; as AWM's own helper does, the first one counts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCENARIO_FILE = "gen_scenario.jsonl"
TASKS_FILE = "gen_tasks.jsonl"
DB_FILE = "gen_db.jsonl"
SAMPLE_FILE = "gen_sample.jsonl"
SPEC_FILE = "gen_spec.jsonl"
ENVS_FILE = "gen_envs.jsonl"
VERIFIER_FILE = "gen_verifier.pure_code.jsonl"
JUDGE_VERIFIER_FILE = "gen_verifier.jsonl"  # AWM-1K's LLM-judge verifiers: not used here.
WORLD_FILES = (
    SCENARIO_FILE,
    TASKS_FILE,
    DB_FILE,
    SAMPLE_FILE,
    SPEC_FILE,
    ENVS_FILE,
    VERIFIER_FILE,
)

MAX_RECORD_BYTES = 64 << 20  # One scenario's record; AWM-1K's largest are full server sources.
_NORMALISED_NAME = re.compile(r"[a-z0-9_]+")
_TRAVERSAL_CHARS = ("/", "\\", "..", "\x00")


class WorldFormatError(ValueError):
    """A world folder that does not follow the AWM format; the message names file, line, key."""


@dataclass(frozen=True)
class World:
    """One scenario's complete definition, as read from an AWM world folder."""

    name: str
    description: str
    tasks: tuple[str, ...]
    db_schema: dict[str, Any]
    sample_data: dict[str, Any]
    api_spec: dict[str, Any]
    full_code: str
    verifiers: dict[int, str]


@dataclass(frozen=True)
class _Where:
    """Location of a record, used to build error messages."""

    file: str
    line: int

    def error(self, message: str) -> WorldFormatError:
        return WorldFormatError(f"{self.file}:{self.line}: {message}")


def _iter_records(path: Path) -> Iterator[tuple[_Where, dict[str, Any]]]:
    """Yield (location, record) for each non-blank line, streaming the file; a line is read
    whole only up to MAX_RECORD_BYTES, so a huge one fails here, not as a memory error."""
    with path.open("rb") as handle:
        for line_number, raw in enumerate(
            iter(lambda: handle.readline(MAX_RECORD_BYTES + 1), b""), 1
        ):
            where = _Where(path.name, line_number)
            if len(raw) > MAX_RECORD_BYTES:
                raise where.error(f"line is over {MAX_RECORD_BYTES:,} bytes; refused")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise where.error(
                    f"not UTF-8 text ({error.reason} at byte {error.start})"
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise where.error(f"invalid JSON: {error}") from None
            except RecursionError:
                raise where.error("invalid JSON: nested too deeply") from None
            except ValueError as error:  # e.g. an integer past Python's 4,300-digit limit
                raise where.error(f"invalid JSON: {error}") from None
            if not isinstance(record, dict):
                raise where.error(f"record must be a JSON object, got {type(record).__name__}")
            yield where, record


def _require(container: Any, key: str, kind: type | tuple[type, ...], where: _Where, path: str):
    """Return container[key], raising a located error when it is missing or mistyped."""
    if not isinstance(container, dict) or key not in container:
        raise where.error(f"missing key '{path}'")
    value = container[key]
    # bool is an int subclass; a task index or count given as true/false is a format error.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        expected = " or ".join(k.__name__ for k in _as_tuple(kind))
        raise where.error(f"key '{path}' must be {expected}, got {type(value).__name__}")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _require_str_list(container: Any, key: str, where: _Where, path: str) -> list[str]:
    values = _require(container, key, list, where, path)
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise where.error(f"key '{path}[{index}]' must be str, got {type(value).__name__}")
    return values


def _check_scenario_name(name: str, where: _Where, key: str) -> None:
    """Reject names that could escape a folder or that AWM would have normalised differently."""
    if any(char in name for char in _TRAVERSAL_CHARS):
        raise where.error(f"key '{key}': scenario name {name!r} contains path traversal characters")
    if not _NORMALISED_NAME.fullmatch(name):
        raise where.error(
            f"key '{key}': scenario name {name!r} is not normalised (lowercase [a-z0-9_] only)"
        )


def _require_items(container: Any, key: str, where: _Where, path: str) -> Iterator[tuple[str, Any]]:
    """(path, entry) for each entry of the list container[key], the path naming it in errors."""
    for index, item in enumerate(_require(container, key, list, where, path)):
        yield f"{path}[{index}]", item


def _check_db_schema(db_schema: dict[str, Any], where: _Where) -> None:
    for prefix, table in _require_items(db_schema, "tables", where, "db_schema.tables"):
        _require(table, "name", str, where, f"{prefix}.name")
        _require(table, "ddl", str, where, f"{prefix}.ddl")
        _require_str_list(table, "indexes", where, f"{prefix}.indexes")


def _check_sample_data(sample_data: dict[str, Any], where: _Where) -> None:
    for prefix, table in _require_items(sample_data, "tables", where, "sample_data.tables"):
        _require(table, "table_name", str, where, f"{prefix}.table_name")
        _require_str_list(table, "insert_statements", where, f"{prefix}.insert_statements")


def _check_api_spec(api_spec: dict[str, Any], where: _Where) -> None:
    for prefix, group in _require_items(api_spec, "api_groups", where, "api_spec.api_groups"):
        _require(group, "group_name", str, where, f"{prefix}.group_name")
        endpoints = _require_items(group, "endpoints", where, f"{prefix}.endpoints")
        for endpoint_prefix, endpoint in endpoints:
            for key in ("path", "method", "operation_id"):
                _require(endpoint, key, str, where, f"{endpoint_prefix}.{key}")


def _scenario_of(record: dict[str, Any], where: _Where, key: str = "scenario") -> str:
    name = _require(record, key, str, where, key)
    _check_scenario_name(name, where, key)
    return name


class _Collector:
    """Gathers one file's records per scenario, rejecting duplicates."""

    def __init__(self, file: str, wanted: set[str] | None):
        self.file = file
        self.wanted = wanted
        self.values: dict[str, Any] = {}
        self.where: dict[str, _Where] = {}

    def wants(self, scenario: str) -> bool:
        return self.wanted is None or scenario in self.wanted

    def add(self, scenario: str, value: Any, where: _Where) -> None:
        if scenario in self.values:
            first = self.where[scenario]
            raise where.error(
                f"duplicate record for scenario '{scenario}' (first at line {first.line})"
            )
        self.values[scenario] = value
        self.where[scenario] = where


def _read_per_scenario(
    folder: Path,
    file: str,
    wanted: set[str] | None,
    value: Callable[[dict[str, Any], _Where], Any],
    name_key: str = "scenario",
) -> _Collector:
    """Each wanted scenario's record of `file`, as `value` checks and extracts it."""
    collector = _Collector(file, wanted)
    for where, record in _iter_records(folder / file):
        scenario = _scenario_of(record, where, name_key)
        if collector.wants(scenario):
            collector.add(scenario, value(record, where), where)
    return collector


def _field(
    key: str, kind: type, check: Callable[[Any, _Where], None] | None = None
) -> Callable[[dict[str, Any], _Where], Any]:
    """A `value` for _read_per_scenario: record[key] of type `kind`, checked by `check`."""

    def value(record: dict[str, Any], where: _Where) -> Any:
        found = _require(record, key, kind, where, key)
        if check is not None:
            check(found, where)
        return found

    return value


def _tasks(record: dict[str, Any], where: _Where) -> tuple[str, ...]:
    return tuple(_require_str_list(record, "tasks", where, "tasks"))


def _read_verifiers(folder: Path, wanted: set[str] | None) -> dict[str, dict[int, tuple]]:
    """Return {scenario: {task_idx: (code, where)}}; one verifier per (scenario, task)."""
    verifiers: dict[str, dict[int, tuple[str, _Where]]] = {}
    for where, record in _iter_records(folder / VERIFIER_FILE):
        scenario = _scenario_of(record, where)
        if wanted is not None and scenario not in wanted:
            continue
        task_idx = _require(record, "task_idx", int, where, "task_idx")
        _require(record, "task", str, where, "task")
        verification = _require(record, "verification", dict, where, "verification")
        code = _require(verification, "code", str, where, "verification.code")
        # AWM-1K repeats some records (10,010 lines for 10,000 tasks); the first one counts.
        verifiers.setdefault(scenario, {}).setdefault(task_idx, (code, where))
    return verifiers


def _check_same_scenarios(reference: _Collector, others: Iterable[_Collector]) -> None:
    """Every scenario must appear in every file; report the first one that does not."""
    for other in others:
        for scenario, where in reference.where.items():
            if scenario not in other.values:
                raise WorldFormatError(
                    f"{other.file}: no record for scenario '{scenario}' "
                    f"(declared at {where.file}:{where.line})"
                )
        for scenario, where in other.where.items():
            if scenario not in reference.values:
                raise where.error(f"scenario '{scenario}' is not declared in {reference.file}")


def _attach_verifiers(
    tasks: _Collector, verifiers: dict[str, dict[int, tuple[str, _Where]]]
) -> dict[str, dict[int, str]]:
    """Match verifiers to tasks: each task needs one, and each verifier needs a task."""
    attached: dict[str, dict[int, str]] = {}
    for scenario, task_list in tasks.values.items():
        per_task = verifiers.get(scenario, {})
        for task_idx in range(len(task_list)):
            if task_idx not in per_task:
                where = tasks.where[scenario]
                raise WorldFormatError(
                    f"{VERIFIER_FILE}: no verifier for scenario '{scenario}' task_idx {task_idx} "
                    f"(task at {where.file}:{where.line})"
                )
        for task_idx, (_, where) in per_task.items():
            if not 0 <= task_idx < len(task_list):
                raise where.error(
                    f"key 'task_idx': {task_idx} is out of range for scenario '{scenario}' "
                    f"({len(task_list)} tasks)"
                )
        attached[scenario] = {task_idx: code for task_idx, (code, _) in sorted(per_task.items())}
    for scenario, per_task in verifiers.items():
        if scenario not in tasks.values:
            where = next(iter(per_task.values()))[1]
            raise where.error(f"scenario '{scenario}' is not declared in {SCENARIO_FILE}")
    return attached


def load_worlds(folder: str | Path, scenarios: Iterable[str] | None = None) -> dict[str, World]:
    """Load every world in an AWM folder (or only `scenarios`), validating all seven files.

    Raises WorldFormatError naming the file, line and key of the first problem found.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise WorldFormatError(f"{folder}: world folder does not exist")
    for file in WORLD_FILES:
        if not (folder / file).is_file():
            if (folder / file).exists():  # A FIFO or a device would block or never end.
                raise WorldFormatError(f"{file}: not a regular file in {folder}; refused")
            judge_only = file == VERIFIER_FILE and (folder / JUDGE_VERIFIER_FILE).is_file()
            note = (
                f" ({JUDGE_VERIFIER_FILE} holds AWM's LLM-judge verifiers; episodes here are "
                f"scored by the pure-code ones)"
                if judge_only
                else ""
            )
            raise WorldFormatError(f"{file}: missing file in {folder}{note}")
    wanted = None
    if scenarios is not None:
        wanted = set(scenarios)
        for name in sorted(wanted):
            _check_scenario_name(name, _Where("scenarios argument", 0), "scenarios")

    declared = _read_per_scenario(
        folder, SCENARIO_FILE, wanted, _field("description", str), name_key="name"
    )
    if wanted is not None:
        missing = sorted(wanted - set(declared.values))
        if missing:
            raise WorldFormatError(f"{SCENARIO_FILE}: requested scenarios not found: {missing}")
    tasks = _read_per_scenario(folder, TASKS_FILE, wanted, _tasks)
    db = _read_per_scenario(folder, DB_FILE, wanted, _field("db_schema", dict, _check_db_schema))
    sample_data = _field("sample_data", dict, _check_sample_data)
    sample = _read_per_scenario(folder, SAMPLE_FILE, wanted, sample_data)
    spec = _read_per_scenario(folder, SPEC_FILE, wanted, _field("api_spec", dict, _check_api_spec))
    envs = _read_per_scenario(folder, ENVS_FILE, wanted, _field("full_code", str))
    _check_same_scenarios(declared, (tasks, db, sample, spec, envs))
    verifiers = _attach_verifiers(tasks, _read_verifiers(folder, wanted))

    return {
        name: World(
            name=name,
            description=declared.values[name],
            tasks=tasks.values[name],
            db_schema=db.values[name],
            sample_data=sample.values[name],
            api_spec=spec.values[name],
            full_code=envs.values[name],
            verifiers=verifiers[name],
        )
        for name in sorted(declared.values)
    }
