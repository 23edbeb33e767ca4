"""A checkpoint's own chat template picks the chat layout its episodes render in, and is held
against that layout before any use.

A chat layout (data.chat: Qwen2.5/Qwen3; data.chat_llama3: Llama 3.1-3.3) builds an episode's
text segment by segment, which is what gives every character its role; a template engine gives
only the whole string. So the checkpoint's template is not what renders the rows: it is what
chooses and checks them. `check_chat_template` renders a probe episode (two calls, the first
answered by every observation field: a result, an error, the verifier's output, a harness
warning) through the checkpoint's Jinja template, as `transformers`' `apply_chat_template` would
(a sandboxed Jinja environment with its `tojson`, `raise_exception` and `strftime_now`), and
returns the layout whose text equals it, whole and as the prompt before each call. Otherwise it
refuses the checkpoint, naming for each layout the first character that differs. A checkpoint
without a template (a base model) gets data.chat with a warning.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import os
from types import ModuleType
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from echo_jax.data import chat, chat_llama3
from echo_jax.data.episodes import Episode, Step
from echo_jax.data.render import observation_fields
from echo_jax.util.choices import ConfigError

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
_log = logging.getLogger(__name__)
LAYOUTS: tuple[ModuleType, ...] = (chat, chat_llama3)  # Tried in this order.

# One call and one observation of every field kind, with the characters a template might
# escape or reorder (quotes, a newline, non-ASCII, nested arguments).
PROBE = Episode(
    scenario="probe",
    task='Set the "quantity" of item 7 to 2.\nThen check the cart.',
    task_idx=0,
    tools=("cart_update", "get_cart"),
    steps=(
        Step(
            "cart_update",
            {"item_id": 7, "fields": {"quantity": 2, "note": "für Zoë"}},
            {
                "tool_result": '{"ok": true, "items": [7]}',
                "error": "HTTP 409: conflict",
                "verify_result": {"passed": False, "reason": "quantity is 1"},
                "warning": "Call a tool next.",
            },
        ),  # fmt: skip
        Step("get_cart", {}, {"tool_result": "[]"}),
    ),
    reward=0.0,
    source="echo_jax.data.chat_template.PROBE",
)


class ChatTemplateError(ConfigError):
    """A checkpoint whose chat template does not render episodes as data.chat does."""


def read_template(folder: str) -> str | None:
    """The template of chat_template.jinja, else tokenizer_config.json's `chat_template` (a
    list of named ones: "tool_use" if present, else "default"), else None."""
    path = os.path.join(folder, TEMPLATE_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    template = _tokenizer_config(folder).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("tool_use") or named.get("default")
    return template if isinstance(template, str) else None


def _tokenizer_config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, TOKENIZER_CONFIG)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _special_tokens(folder: str) -> dict[str, str]:
    """bos_token and eos_token of tokenizer_config.json (templates may print them)."""
    config = _tokenizer_config(folder)
    out = {}
    for name in ("bos_token", "eos_token"):
        token = config.get(name)
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str):
            out[name] = token
    return out


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)  # fmt: skip


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


@functools.cache
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


def episode_messages(episode: Episode) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The episode as chat messages and tools: the task as the user turn, each call as an
    assistant turn of one tool call, each observation field as a tool message."""
    tools = [json.loads(chat.render_tool(name)) for name in episode.tools]
    messages: list[dict[str, Any]] = [{"role": "user", "content": episode.task}]
    for step in episode.steps:
        call = {"name": step.tool_name, "arguments": step.arguments}
        messages.append(
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"type": "function", "function": call}],
            }
        )
        for _, text, _ in observation_fields(step.observation):
            messages.append({"role": "tool", "content": text[:-1]})  # The layout's own newline.
    return messages, tools


def render_template(
    template: str, episode: Episode, calls: int | None = None, variables: dict | None = None
) -> str:
    """The template's text of the episode, or of its prompt before call `calls` (0-based:
    the messages before that call, and the generation prompt); `variables` as
    `apply_chat_template`'s keyword arguments (special tokens, a layout's TEMPLATE_VARS)."""
    messages, tools = episode_messages(episode)
    if calls is not None:
        starts = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        messages = messages[: starts[calls]]
    return _compile(template).render(
        messages=messages,
        tools=tools,
        add_generation_prompt=calls is not None,
        **(variables or {}),
    )


def _first_difference(a: str, b: str) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def _mismatch(
    folder: str, template: str, special: dict, layout: ModuleType, episode: Episode
) -> str | None:
    """Where the template's text first differs from `layout`'s (None: nowhere)."""
    rendered = layout.render_chat(episode)
    # The layout's prompt before call i: every segment before the step, then the template's
    # generation prompt (a layout's CALL_MARK may add the harness's opening tag after it).
    checks = [("the episode", None, rendered.text)]
    checks += [
        (f"the prompt before call {i}", i,
         "".join(text for text, _ in rendered.segments[:start]) + layout.GENERATION_PROMPT)
        for i, start in enumerate(rendered.step_starts)
    ]  # fmt: skip
    for what, calls, want in checks:
        try:
            got = render_template(template, episode, calls, special | layout.TEMPLATE_VARS)
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"{folder}: its chat template fails on {what}: {e}") from e
        if got != want:
            at = _first_difference(got, want)
            return (
                f"as {layout.__name__} ({layout.DESCRIPTION}), {what} differs at character "
                f"{at}: template {got[max(at - 40, 0) : at + 40]!r}, layout "
                f"{want[max(at - 40, 0) : at + 40]!r}"
            )
    return None


def check_chat_template(folder: str, episode: Episode = PROBE) -> ModuleType:
    """The chat layout (of LAYOUTS) whose text of `episode`, and of the prompt before each of
    its calls, is exactly the checkpoint's template's; raises ChatTemplateError if none is."""
    template = read_template(folder)
    if template is None:
        _log.warning("%s has no chat template: episodes render in data.chat's layout", folder)
        return chat
    special = _special_tokens(folder)
    reasons = []
    for layout in LAYOUTS:
        reason = _mismatch(folder, template, special, layout, episode)
        if reason is None:
            return layout
        reasons.append(reason)
    raise ChatTemplateError(
        f"{folder}: its chat template renders episodes as no supported chat layout does. "
        + "; ".join(reasons)
        + ". A checkpoint of another family needs a layout module of its own (docs/models.md)."
    )
