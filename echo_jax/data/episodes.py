"""Captured episodes: the one schema and the validation of one decoded record.

The canonical shape is the real AWM capture's (data/awm_e_commerce_33_task0.json):
{scenario, task, task_idx, tools, steps: [{action: {tool_name, arguments}, observation}], reward}.
Optional keys (tool_schemas, step_reward_types, metadata, ...) are kept in `extras`.

Every problem is an EpisodeError naming the file (and line), the field and what is wrong: a
missing or mistyped key, an empty `steps`, a reward that is not a finite number in
[-MAX_ABS_REWARD, MAX_ABS_REWARD], a string over the per-field size cap, nesting deeper than
MAX_NESTING, a lone surrogate (text that cannot be UTF-8). Reading files (bad bytes, truncated
gzip, size bounds, duplicates, skipping invalid episodes) is `echo_jax.data.episode_files`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from typing import Any

# Observation fields rendered as world output, in this order; `warning` is harness boilerplate.
ENV_OUTPUT_FIELDS = ("tool_result", "error", "verify_result")
WARNING_FIELD = "warning"

# Longest string value (characters) anywhere in an episode: the harness clips tool results to
# 16,000 characters, so a megabyte is a broken or hostile file, not an episode.
DEFAULT_MAX_FIELD_CHARS = 1 << 20
MAX_NESTING = 64  # Deepest JSON nesting accepted (objects and arrays).
MAX_ABS_REWARD = 1e6  # Rewards are O(1); this keeps float32 group statistics finite.
MAX_TASK_IDX = 2**31 - 1  # Task indices are small; int32 everywhere downstream.

_SURROGATE = re.compile("[\ud800-\udfff]")
_INDEX = re.compile(r"\[\d+\]")


class EpisodeError(ValueError):
    """Bad episode input; the message names the file, the episode and the field."""

    def __init__(self, source: str, field: str, problem: str):
        self.source = source
        self.field = field
        self.problem = problem
        super().__init__(f"{source}: field '{field}': {problem}")

    @property
    def reason(self) -> str:
        """The kind of problem without positions or values, for grouping skipped episodes."""
        return (
            f"field '{_INDEX.sub('[]', self.field)}': {re.split(r'[:(]', self.problem)[0].strip()}"
        )


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
    content_hash: str = ""  # Of the record's canonical JSON; equal hashes mean a duplicate.

    @property
    def group_key(self) -> tuple[str, int]:
        """Episodes of one scenario and task form a GRPO group."""
        return (self.scenario, self.task_idx)


_REQUIRED = {"scenario": str, "task": str, "task_idx": int, "tools": list, "steps": list}


def _type_name(value: Any) -> str:
    return type(value).__name__


def content_hash(record: Any) -> str:
    """A hash of the record's canonical JSON: key order and whitespace do not matter."""
    text = json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def _short_number(value: int) -> str:
    return str(value) if abs(value) < 10**50 else "an integer of more than 50 digits"


def _check_values(value: Any, source: str, where: str, depth: int, max_field_chars: int) -> None:
    """Every string within the size cap and encodable as UTF-8; nesting within MAX_NESTING; every
    float finite (NaN and Infinity are not JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise EpisodeError(source, where or "<episode>", f"not finite: {value} (not JSON)")
    if isinstance(value, str):
        if len(value) > max_field_chars:
            raise EpisodeError(
                source,
                where,
                f"too large: {len(value):,} characters, over the limit of {max_field_chars:,} "
                "(max_field_chars)",
            )
        match = _SURROGATE.search(value)
        if match:
            raise EpisodeError(
                source, where, f"not valid text: lone surrogate at character {match.start()}"
            )
        return
    if not isinstance(value, dict | list):
        return
    if depth >= MAX_NESTING:
        short = where if len(where) <= 80 else where[:80] + "..."
        raise EpisodeError(source, short, f"nested deeper than {MAX_NESTING} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_values(
                key, source, f"{where}.<key>" if where else "<key>", depth + 1, max_field_chars
            )
            _check_values(
                item, source, f"{where}.{key}" if where else key, depth + 1, max_field_chars
            )
    else:
        for i, item in enumerate(value):
            _check_values(item, source, f"{where}[{i}]", depth + 1, max_field_chars)


def parse_episode(
    record: Any, source: str, max_field_chars: int = DEFAULT_MAX_FIELD_CHARS
) -> Episode:
    """Validates one decoded JSON record; raises EpisodeError naming the bad field."""
    if not isinstance(record, dict):
        raise EpisodeError(source, "<episode>", f"expected a JSON object, got {_type_name(record)}")
    for key, typ in _REQUIRED.items():
        if key not in record:
            raise EpisodeError(source, key, "missing")
        value = record[key]
        if not isinstance(value, typ) or isinstance(value, bool):
            raise EpisodeError(source, key, f"expected {typ.__name__}, got {_type_name(value)}")
    if record["task_idx"] < 0:
        raise EpisodeError(source, "task_idx", f"must be >= 0 (got {record['task_idx']})")
    if record["task_idx"] > MAX_TASK_IDX:
        raise EpisodeError(
            source, "task_idx", f"out of range: {_short_number(record['task_idx'])} (<= 2**31 - 1)"
        )
    if "reward" not in record:
        raise EpisodeError(source, "reward", "missing")
    reward = record["reward"]
    if isinstance(reward, bool) or not isinstance(reward, int | float):
        raise EpisodeError(source, "reward", f"expected a number, got {_type_name(reward)}")
    if isinstance(reward, int) and abs(reward) > MAX_ABS_REWARD:  # float() would overflow
        raise EpisodeError(
            source, "reward", f"out of range: {_short_number(reward)} (|reward| <= 1e6)"
        )
    if not math.isfinite(reward):
        raise EpisodeError(source, "reward", f"not finite: {reward}")
    if abs(reward) > MAX_ABS_REWARD:
        raise EpisodeError(source, "reward", f"out of range: {reward} (|reward| <= 1e6)")
    for i, tool in enumerate(record["tools"]):
        if not isinstance(tool, str):
            raise EpisodeError(source, f"tools[{i}]", f"expected str, got {_type_name(tool)}")
    if not record["steps"]:
        raise EpisodeError(source, "steps", "empty: an episode needs at least one step")
    _check_values(record, source, "", 0, max_field_chars)
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
        content_hash=content_hash(record),
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
