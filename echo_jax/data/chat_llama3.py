"""An episode rendered as a Llama 3.1-3.3 Instruct chat with custom tools, as role-tagged segments.

The text is exactly what those checkpoints' chat template makes of the episode's messages with
its defaults (tools in the first user message) and a fixed `date_string` (TEMPLATE_VARS, so that
rows do not change with the day; the 3.2 and 3.3 templates otherwise print today's date): the
system header, the tool list and the task as the first user turn, each call as an assistant turn
`{"name": ..., "parameters": ...}<|eot_id|>`, and each observation field as an `ipython` turn
whose body is the field's text as a JSON string (the template's `tojson` of a string).
`data.chat_template` holds a checkpoint's own template against this text before any use.

Roles: the call's JSON and the `<|eot_id|>` that ends it are ACTION (the model stops there);
each field's JSON string, quotes included, is ENV_OUTPUT (WARNING for the harness's); headers,
the instructions and the tool list are CONTEXT.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from echo_jax.data import roles
from echo_jax.data.chat import render_tool  # The tool schema every chat template is given.
from echo_jax.data.episodes import Episode
from echo_jax.data.render import Rendered, observation_fields, render_in

DESCRIPTION = "Llama 3.1-3.3 custom tools in the first user message"
# Template variables the rendering assumes; the check passes them to the template too.
TEMPLATE_VARS = {"date_string": "26 Jul 2024"}
BEGIN = "<|begin_of_text|>"
END_TURN = "<|eot_id|>"


def header(role: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


SYSTEM = (
    BEGIN + header("system") + "Environment: ipython\nCutting Knowledge Date: December 2023\n"
    f"Today Date: {TEMPLATE_VARS['date_string']}\n\n" + END_TURN
)
TOOLS_HEAD = (
    header("user") + "Given the following functions, please respond with a JSON for a function "
    "call with its proper arguments that best answers the given prompt.\n\nRespond in the format "
    '{"name": function name, "parameters": dictionary of argument name and its value}.Do not use '
    "variables.\n\n"
)
GENERATION_PROMPT = header("assistant")  # The template's own prompt for the next turn.
CALL_MARK = GENERATION_PROMPT  # The prompt ends here; the model writes the call's JSON.
END_CALL = END_TURN  # Ends the ACTION: where generation stops.
AFTER_ACTION = ""  # The call's END_TURN closes the assistant's turn.
TOOL_TURN = header("ipython")
NAME_KEY = "name"  # agent.policy.parse_action reads {"name", "parameters"} ...
ARGS_KEY = "parameters"
PARSE_END = END_CALL  # ... up to the end of the turn.


def render_action(tool_name: str, arguments: dict[str, Any]) -> str:
    """The text the policy emits for a call, its end-of-turn token included (ACTION)."""
    call = {NAME_KEY: tool_name, ARGS_KEY: arguments}
    return json.dumps(call, ensure_ascii=False) + END_CALL


def after_call(text: str) -> str:
    """CONTEXT between a call's generated text and its observation: the end of the turn, when
    the call did not end it (cut at its token budget)."""
    return "" if text.endswith(END_CALL) else END_TURN


def render_prefix(task: str, tools: Sequence[str]) -> list[tuple[str, int]]:
    """The CONTEXT prefix every row starts with: the system turn, the tools and the task."""
    tool_blocks = "".join(
        json.dumps(json.loads(render_tool(name)), ensure_ascii=False, indent=4) + "\n\n"
        for name in tools
    )
    return [(SYSTEM + TOOLS_HEAD + tool_blocks + task.strip() + END_TURN, roles.CONTEXT)]


def render_observation(observation: dict[str, Any], canonical_json: bool = False):
    """One `ipython` turn per field, its text as a JSON string: world output first, harness
    warning last (the field's closing newline is the layout's, not the text's)."""
    segments: list[tuple[str, int]] = []
    for _, text, role in observation_fields(observation, canonical_json):
        segments.append((TOOL_TURN, roles.CONTEXT))
        segments.append((json.dumps(text[:-1], ensure_ascii=False), role))
        segments.append((END_TURN, roles.CONTEXT))
    return segments


def render_chat(
    episode: Episode,
    canonical_json: bool = False,
    actions: Sequence[Sequence[tuple[str, int]] | None] | None = None,
) -> Rendered:
    """`render.render_in` this layout; `actions` as there (the generated text)."""
    return render_in(sys.modules[__name__], episode, canonical_json, actions)


render_episode = render_chat  # The name every layout gives it.
