"""An episode rendered as a Qwen-style chat with tool calls, as role-tagged segments.

The text is exactly what the checkpoint's chat template (tests/fixtures/hf/tiny-qwen3's
chat_template.jinja, the layout of Qwen2.5/Qwen3's tool calls without thinking blocks) makes of
the episode's messages: a system turn listing the tools, the task as the user turn, each call
as an assistant turn holding `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`, and
each observation's fields as `<tool_response>` blocks of one user turn. Building the text here,
segment by segment, is what gives every character its role exactly (a template engine gives
only the whole string); tests/test_hf_chat.py checks the text against `transformers`' rendering.

Roles: the call's JSON and its closing `</tool_call>` are ACTION (the model writes them and
stops there); tool results, errors and verifier output are ENV_OUTPUT, harness warnings
WARNING; every piece of template scaffolding (turn markers, tags, the tool list) is CONTEXT.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from echo_jax.data import roles
from echo_jax.data.episodes import Episode
from echo_jax.data.render import Rendered, observation_fields, render_in

SYSTEM_HEAD = (
    "<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the user "
    "query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n"
    "<tools>"
)
SYSTEM_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
)
DESCRIPTION = "Qwen2.5/Qwen3 tool calls, no thinking block"
TEMPLATE_VARS: dict[str, str] = {}  # Template variables the rendering assumes: none.
GENERATION_PROMPT = "<|im_start|>assistant\n"  # The template's own prompt for the next turn.
# The prompt ends here, the call's opening tag written by the harness; the model writes on.
CALL_MARK = GENERATION_PROMPT + "<tool_call>\n"
END_CALL = "\n</tool_call>"  # Closes the ACTION: where generation stops.
END_TURN = "<|im_end|>\n"
AFTER_ACTION = END_TURN  # Closes the assistant's turn after its call.
TOOL_TURN = "<|im_start|>user"
RESPONSE_OPEN = "\n<tool_response>\n"
RESPONSE_CLOSE = "</tool_response>"
NAME_KEY = "name"  # agent.policy.parse_action reads {"name", "arguments"} ...
ARGS_KEY = "arguments"
PARSE_END = "</tool_call>"  # ... up to the closing tag.


def render_tool(name: str) -> str:
    return json.dumps({"type": "function", "function": {"name": name}}, ensure_ascii=False)


def render_action(tool_name: str, arguments: dict[str, Any]) -> str:
    """The text the policy emits for a call, closing tag included (ACTION)."""
    call = {NAME_KEY: tool_name, ARGS_KEY: arguments}
    return json.dumps(call, ensure_ascii=False) + END_CALL


def after_call(text: str) -> str:
    """CONTEXT text between a call's generated text and its observation: the turn's end."""
    return END_TURN


def render_prefix(task: str, tools: Sequence[str]) -> list[tuple[str, int]]:
    """The CONTEXT prefix every row starts with: the tool list, then the task."""
    tool_lines = "".join("\n" + render_tool(name) for name in tools)
    return [
        (SYSTEM_HEAD + tool_lines + SYSTEM_TAIL, roles.CONTEXT),
        ("<|im_start|>user\n" + task + END_TURN, roles.CONTEXT),
    ]


def render_observation(observation: dict[str, Any], canonical_json: bool = False):
    """One user turn of `<tool_response>` blocks: world output first, harness warning last."""
    segments: list[tuple[str, int]] = []
    for _, text, role in observation_fields(observation, canonical_json):
        opener = (TOOL_TURN if not segments else "") + RESPONSE_OPEN
        segments.append((opener, roles.CONTEXT))
        # The newline before the closing tag belongs to the body: the pre-tokeniser joins a
        # trailing punctuation run with the newlines after it ("}\n"), so it must not straddle.
        segments.append((text, role))
        segments.append((RESPONSE_CLOSE, roles.CONTEXT))
    if segments:
        segments.append((END_TURN, roles.CONTEXT))
    return segments


def render_chat(
    episode: Episode,
    canonical_json: bool = False,
    actions: Sequence[Sequence[tuple[str, int]] | None] | None = None,
) -> Rendered:
    """`render.render_in` the chat layout; `actions` as there (the generated text)."""
    return render_in(sys.modules[__name__], episode, canonical_json, actions)


render_episode = render_chat  # The name both layouts give it (data.render is the other).
