"""The one renderer: an episode becomes text made of role-tagged segments.

Layout (markers are CONTEXT, written by the harness):

    <|task|>\\n{task}\\n<|tools|>\\n{tool per line}\\n          CONTEXT prefix
    <|call|>\\n                                               CONTEXT
    {"tool_name": ..., "arguments": ...}\\n<|end_call|>\\n      ACTION (body + closing marker)
    <|result|>\\n{tool_result}\\n                              CONTEXT marker, ENV_OUTPUT body
    <|error|>\\n{error}\\n                                     CONTEXT marker, ENV_OUTPUT body
    <|verify|>\\n{verify_result as JSON}\\n                    CONTEXT marker, ENV_OUTPUT body
    <|warning|>\\n{warning}\\n                                 CONTEXT marker, WARNING body

Every segment ends with a newline and every marker starts with '<'. cl100k's pre-tokeniser never
puts a newline and a following non-space character in one piece, so role boundaries fall between
tokens; a body that itself starts with whitespace is the one case that can straddle, and the
tokenizer counts and reports it.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from echo_jax.data import roles
from echo_jax.data.episodes import ENV_OUTPUT_FIELDS, WARNING_FIELD, Episode

TASK_MARK = "<|task|>\n"
TOOLS_MARK = "<|tools|>\n"
CALL_MARK = "<|call|>\n"
END_CALL = "\n<|end_call|>\n"
# What the agent's parser (agent.policy.parse_action) reads: the call's name key, and the
# marker up to which the call's JSON runs.
NAME_KEY = "tool_name"
ARGS_KEY = "arguments"
PARSE_END = END_CALL
AFTER_ACTION = ""  # CONTEXT closing the agent's turn after its call: none in this layout.
FIELD_MARKS = {
    "tool_result": "<|result|>\n",
    "error": "<|error|>\n",
    "verify_result": "<|verify|>\n",
    WARNING_FIELD: "<|warning|>\n",
}


@dataclasses.dataclass(frozen=True)
class Rendered:
    segments: tuple[tuple[str, int], ...]  # (text, role) in order.
    prefix_segments: int  # The first this-many segments are the CONTEXT prefix.
    step_starts: tuple[int, ...]  # Segment index at which each step begins.

    @property
    def text(self) -> str:
        return "".join(text for text, _ in self.segments)


def render_action(tool_name: str, arguments: dict[str, Any]) -> str:
    """The text the policy emits for a tool call, closing marker included."""
    call = {"tool_name": tool_name, "arguments": arguments}
    return json.dumps(call, ensure_ascii=False) + END_CALL


def after_call(text: str) -> str:
    """CONTEXT text between a call's generated text and its observation: a newline closing an
    unclosed call (a closed one ends with END_CALL's)."""
    return "" if text.endswith("\n") else "\n"


def _canonical(text: str) -> str:
    try:
        return json.dumps(
            json.loads(text), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )
    except json.JSONDecodeError:
        return text


def _field_text(key: str, value: Any, canonical_json: bool) -> str:
    if isinstance(value, str):
        return _canonical(value) if canonical_json and key == "tool_result" else value
    return json.dumps(value, ensure_ascii=False, sort_keys=canonical_json)


def render_prefix(task: str, tools: tuple[str, ...] | list[str]) -> list[tuple[str, int]]:
    """The CONTEXT prefix every row of an episode starts with."""
    tool_lines = "".join(f"{name}\n" for name in tools)
    return [
        (TASK_MARK, roles.CONTEXT),
        (task + "\n", roles.CONTEXT),
        (TOOLS_MARK + tool_lines, roles.CONTEXT),
    ]


def observation_fields(
    observation: dict[str, Any], canonical_json: bool = False
) -> list[tuple[str, str, int]]:
    """(field, body text, role) of each field an observation has: world output first, harness
    warning last; the body ends with a newline (every layout puts it inside the field's role)."""
    return [
        (key, _field_text(key, observation[key], canonical_json) + "\n",
         roles.WARNING if key == WARNING_FIELD else roles.ENV_OUTPUT)
        for key in (*ENV_OUTPUT_FIELDS, WARNING_FIELD)
        if observation.get(key) is not None
    ]  # fmt: skip


def render_observation(observation: dict[str, Any], canonical_json: bool = False):
    """Segments for one observation: each field's mark, then its body."""
    segments: list[tuple[str, int]] = []
    for key, text, role in observation_fields(observation, canonical_json):
        segments.append((FIELD_MARKS[key], roles.CONTEXT))
        segments.append((text, role))
    return segments


def render_in(
    layout: ModuleType,
    episode: Episode,
    canonical_json: bool = False,
    actions: Sequence[Sequence[tuple[str, int]] | None] | None = None,
) -> Rendered:
    """The episode's segments in `layout` (this module, `data.chat` or `data.chat_llama3`): its
    prefix, then per step the call mark, the call, what closes the agent's turn, and the
    observation.

    `actions`, when given, holds per step the segments that replace its rendered call (None
    keeps it): on-policy data renders the text the model generated, not a re-serialisation of
    what the harness parsed from it, and a call the harness made itself as CONTEXT."""
    if actions is not None and len(actions) != len(episode.steps):
        raise ValueError(f"{len(actions)} action overrides for {len(episode.steps)} steps")
    segments = layout.render_prefix(episode.task, episode.tools)
    prefix_segments = len(segments)
    step_starts = []
    for i, step in enumerate(episode.steps):
        step_starts.append(len(segments))
        segments.append((layout.CALL_MARK, roles.CONTEXT))
        override = actions[i] if actions is not None else None
        if override is None:
            segments.append((layout.render_action(step.tool_name, step.arguments), roles.ACTION))
        else:
            segments.extend(override)
        if layout.AFTER_ACTION:
            segments.append((layout.AFTER_ACTION, roles.CONTEXT))
        segments.extend(layout.render_observation(step.observation, canonical_json))
    return Rendered(tuple(segments), prefix_segments, tuple(step_starts))


def render_episode(
    episode: Episode,
    canonical_json: bool = False,
    actions: Sequence[Sequence[tuple[str, int]] | None] | None = None,
) -> Rendered:
    """`render_in` this module's layout."""
    return render_in(sys.modules[__name__], episode, canonical_json, actions)
