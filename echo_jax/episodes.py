"""Captured episodes: the one schema, its validation, and reading .json / .jsonl / .jsonl.gz.

The canonical shape is the real AWM capture's (data/awm_e_commerce_33_task0.json):
{scenario, task, task_idx, tools, steps: [{action: {tool_name, arguments}, observation}], reward}.
Optional keys (tool_schemas, step_reward_types, metadata, ...) are kept in `extras`.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import math
import os
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

# Observation fields rendered as world output, in this order; `warning` is harness boilerplate.
ENV_OUTPUT_FIELDS = ("tool_result", "error", "verify_result")
WARNING_FIELD = "warning"


class EpisodeError(ValueError):
    """Bad episode input; the message names the file, the episode and the field."""

    def __init__(self, source: str, field: str, problem: str):
        self.source = source
        self.field = field
        self.problem = problem
        super().__init__(f"{source}: field '{field}': {problem}")


@dataclasses.dataclass(frozen=True)
class Step:
    tool_name: str
    arguments: dict[str, Any]
    observation: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Episode:
    scenario: str
    task: str
    task_idx: int
    tools: tuple[str, ...]
    steps: tuple[Step, ...]
    reward: float
    source: str  # "file:line" or "file"; where errors and reports point.
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def group_key(self) -> tuple[str, int]:
        """Episodes of one scenario and task form a GRPO group."""
        return (self.scenario, self.task_idx)


_REQUIRED = {"scenario": str, "task": str, "task_idx": int, "tools": list, "steps": list}


def _type_name(value: Any) -> str:
    return type(value).__name__


def parse_episode(record: Any, source: str) -> Episode:
    """Validates one decoded JSON record; raises EpisodeError naming the bad field."""
    if not isinstance(record, dict):
        raise EpisodeError(source, "<episode>", f"expected a JSON object, got {_type_name(record)}")
    for key, typ in _REQUIRED.items():
        if key not in record:
            raise EpisodeError(source, key, "missing")
        value = record[key]
        if not isinstance(value, typ) or isinstance(value, bool):
            raise EpisodeError(source, key, f"expected {typ.__name__}, got {_type_name(value)}")
    if "reward" not in record:
        raise EpisodeError(source, "reward", "missing")
    reward = record["reward"]
    if isinstance(reward, bool) or not isinstance(reward, int | float):
        raise EpisodeError(source, "reward", f"expected a number, got {_type_name(reward)}")
    if not math.isfinite(reward):
        raise EpisodeError(source, "reward", f"not finite: {reward}")
    for i, tool in enumerate(record["tools"]):
        if not isinstance(tool, str):
            raise EpisodeError(source, f"tools[{i}]", f"expected str, got {_type_name(tool)}")
    if not record["steps"]:
        raise EpisodeError(source, "steps", "empty: an episode needs at least one step")
    steps = tuple(_parse_step(s, source, f"steps[{i}]") for i, s in enumerate(record["steps"]))
    extras = {k: v for k, v in record.items() if k not in _REQUIRED and k != "reward"}
    return Episode(
        scenario=record["scenario"],
        task=record["task"],
        task_idx=record["task_idx"],
        tools=tuple(record["tools"]),
        steps=steps,
        reward=float(reward),
        source=source,
        extras=extras,
    )


def _parse_step(step: Any, source: str, where: str) -> Step:
    if not isinstance(step, dict):
        raise EpisodeError(source, where, f"expected an object, got {_type_name(step)}")
    action = step.get("action")
    if not isinstance(action, dict):
        raise EpisodeError(source, f"{where}.action", "missing or not an object")
    name = action.get("tool_name")
    if not isinstance(name, str) or not name:
        raise EpisodeError(source, f"{where}.action.tool_name", "missing or not a non-empty string")
    arguments = action.get("arguments", {})
    if not isinstance(arguments, dict):
        raise EpisodeError(
            source, f"{where}.action.arguments", f"expected object, got {_type_name(arguments)}"
        )
    observation = step.get("observation")
    if not isinstance(observation, dict):
        raise EpisodeError(source, f"{where}.observation", "missing or not an object")
    for key in ("tool_result", "error", WARNING_FIELD):
        value = observation.get(key)
        if value is not None and not isinstance(value, str):
            raise EpisodeError(
                source, f"{where}.observation.{key}", f"expected str, got {_type_name(value)}"
            )
    return Step(tool_name=name, arguments=arguments, observation=observation)


def expand_paths(patterns: Sequence[str]) -> list[str]:
    """Files named by paths or globs, in a stable order; an empty match is an error."""
    files: list[str] = []
    for pattern in patterns:
        matches = (
            sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        )
        matches = [m for m in matches if not os.path.isdir(m)]
        if not matches:
            raise EpisodeError(pattern, "<path>", "no episode file matches")
        files.extend(matches)
    return files


def _records(path: str) -> Iterator[tuple[Any, str]]:
    """(decoded record, source) pairs; one per .json file, one per .jsonl(.gz) line."""
    if not os.path.isfile(path):
        raise EpisodeError(path, "<file>", "does not exist")
    if path.endswith(".json"):
        yield _decode(_read_text(path), path), path
        return
    if not path.endswith((".jsonl", ".jsonl.gz")):
        raise EpisodeError(path, "<file>", "unknown extension (expected .json, .jsonl, .jsonl.gz)")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if raw.strip():
                    source = f"{path}:{lineno}"
                    yield _decode(_utf8(raw, source), source), source
    except (OSError, EOFError, zlib.error) as e:
        raise EpisodeError(path, "<file>", f"cannot be read ({e})") from None


def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        return _utf8(f.read(), path)


def _utf8(raw: bytes, source: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EpisodeError(source, "<bytes>", f"not UTF-8 at byte {e.start}") from None


def _decode(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise EpisodeError(source, "<json>", f"invalid JSON: {e}") from None


def load_episodes(patterns: Sequence[str]) -> list[Episode]:
    """Every episode under `patterns`, validated; the first bad one raises EpisodeError."""
    return [
        parse_episode(rec, src) for path in expand_paths(patterns) for rec, src in _records(path)
    ]
