"""The chat layouts (echo_jax.data.chat: Qwen3; echo_jax.data.chat_llama3: Llama 3) under a
real tokenizer (echo_jax.data.hf_tokenizer): each layout's text is its family's chat template's
own rendering (stored by tests/fixtures/hf/make_fixtures.py from `transformers`'
apply_chat_template), and on the shipped corpus every ACTION token lies inside a tool call and
every ENV_OUTPUT token inside a tool result, found in the text by pattern, not from the
segments."""

from __future__ import annotations

import functools
import json
import os
import re

import numpy as np
import pytest

from echo_jax.agent.policy import ActionParseError, parse_action, parse_chat_action
from echo_jax.data import chat, chat_llama3, roles
from echo_jax.data.corpus import shard_files
from echo_jax.data.episode_files import load_episodes
from echo_jax.data.hf_tokenizer import load_tokenizer, tokenize_chat
from echo_jax.data.render import Rendered

HERE = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
FOLDER = os.path.join(HERE, "tiny-qwen3")
CORPUS = os.path.join(os.path.dirname(__file__), "..", "data", "corpus")
# Per fixture: its layout, the end of its system turn, and patterns whose group 1 is a call's
# text (its closing mark included) and a tool result's body, written from the templates.
FAMILIES = {
    "tiny-qwen3": (chat, "<|im_end|>", r"<tool_call>\n(.*?</tool_call>)",
                   r"<tool_response>\n(.*?)</tool_response>"),
    "tiny-llama": (chat_llama3, "<|eot_id|>",
                   r"<\|start_header_id\|>assistant<\|end_header_id\|>\n\n(.*?<\|eot_id\|>)",
                   r"<\|start_header_id\|>ipython<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>"),
}  # fmt: skip


@functools.cache
def corpus():
    return load_episodes(shard_files(CORPUS))


@pytest.mark.parametrize("family", FAMILIES)
def test_render_equals_the_chat_template(family):
    layout = FAMILIES[family][0]
    with open(os.path.join(HERE, "chat_reference.json")) as f:
        ref = json.load(f)
    first = next(ep for ep in corpus() if ep.source.split(":")[0].endswith(ref["episode"]))
    rendered = layout.render_chat(first)
    assert rendered.text == ref[family]["text"]
    prefix = "".join(t for t, _ in rendered.segments[: rendered.prefix_segments])
    assert prefix + layout.GENERATION_PROMPT == ref[family]["prompt"]
    assert layout.CALL_MARK.startswith(layout.GENERATION_PROMPT)


def _regions(text: str, pattern: str, system_end: str) -> np.ndarray:
    """[n, 2] character spans of pattern's group 1 (after the system turn)."""
    skip = text.index(system_end)
    return np.array(
        [m.span(1) for m in re.finditer(pattern, text, re.DOTALL) if m.start() > skip]
    ).reshape(-1, 2)


def _inside(starts: np.ndarray, ends: np.ndarray, regions: np.ndarray) -> np.ndarray:
    if not regions.size:
        return np.zeros(starts.shape, bool)
    i = np.searchsorted(regions[:, 0], starts, side="right") - 1
    ok = i >= 0
    i = np.maximum(i, 0)
    return ok & (starts >= regions[i, 0]) & (ends <= regions[i, 1])


@pytest.mark.parametrize("family", FAMILIES)
def test_roles_under_the_real_tokenizer_on_the_corpus(family):
    layout, system_end, call_pattern, result_pattern = FAMILIES[family]
    tok = load_tokenizer(os.path.join(HERE, family))
    episodes = corpus()[::8]  # Every 8th (315); the whole corpus (2520) was checked alike.
    straddles = actions = env = 0
    for ep in episodes:
        rendered = layout.render_chat(ep)
        text = rendered.text
        t = tokenize_chat(rendered, tok)
        enc = tok.encode(text, add_special_tokens=False)
        spans = np.asarray(enc.offsets).reshape(-1, 2)
        calls = _regions(text, call_pattern, system_end)
        results = _regions(text, result_pattern, system_end)
        is_action, is_env = t.roles == roles.ACTION, t.roles == roles.ENV_OUTPUT
        assert _inside(spans[is_action, 0], spans[is_action, 1], calls).all(), ep.source
        assert _inside(spans[is_env, 0], spans[is_env, 1], results).all(), ep.source
        # Decoded, the ACTION tokens are the calls' text, call by call.
        decoded = tok.decode(t.ids[is_action].tolist(), skip_special_tokens=False)
        assert decoded == "".join(text[a:b] for a, b in calls), ep.source
        straddles += t.straddles
        actions += int(is_action.sum())
        env += int(is_env.sum())
    print(f"{family}, {len(episodes)} episodes: {actions} ACTION, {env} ENV_OUTPUT tokens, "
          f"{straddles} straddles")  # fmt: skip
    assert actions > 0 and env > 0
    assert straddles == 0


def test_a_straddle_is_counted():
    """Segments cut inside a token ("{\\n" is one token here): it is counted and takes its
    first character's role."""
    tok = load_tokenizer(FOLDER)
    segments = (("go", roles.CONTEXT), ("{", roles.ACTION), ("\n", roles.ENV_OUTPUT))
    t = tokenize_chat(Rendered(segments, 1, ()), tok)
    assert tok.decode(t.ids.tolist()) == "go{\n" and t.ids.size == 3
    assert t.straddles == 1
    assert t.roles.tolist() == [roles.CONTEXT, roles.CONTEXT, roles.ACTION]


@pytest.mark.parametrize(
    "text, call",
    [
        ('{"name": "search", "arguments": {"q": 1}}\n</tool_call>', ("search", {"q": 1})),
        ('{"name": "list", "arguments": {}}</tool_call><|im_end|>', ("list", {})),
    ],
)
def test_parse_chat_action(text, call):
    assert parse_chat_action(text) == {"tool_name": call[0], "arguments": call[1]}


@pytest.mark.parametrize(
    "text, why",
    [
        ('{"name": "x", "arguments": {}}', "closed"),
        ('{"name": "x", "arguments": {}</tool_call>', "JSON"),
        ('{"tool": "x"}</tool_call>', "unexpected keys"),
        ('{"name": "", "arguments": {}}</tool_call>', "name"),
    ],
)
def test_parse_chat_action_errors(text, why):
    with pytest.raises(ActionParseError, match=why):
        parse_chat_action(text)


def test_parse_a_llama3_call():
    """Llama 3's calls: bare JSON with "parameters", ended by <|eot_id|>."""
    text = '{"name": "search", "parameters": {"q": 1}}<|eot_id|>'
    assert parse_action(text, chat_llama3) == {"tool_name": "search", "arguments": {"q": 1}}
    assert parse_action(chat_llama3.render_action("list", {}), chat_llama3)["arguments"] == {}
    for bad, why in [
        ('{"name": "x", "parameters": {}}', "not closed with <|eot_id|>"),
        ('{"name": "x", "arguments": {}}<|eot_id|>', r"unexpected keys \['arguments'\]"),
        ('{"name": "x", "parameters": []}<|eot_id|>', "'parameters' must be a JSON object"),
    ]:
        with pytest.raises(ActionParseError, match=why):
            parse_action(bad, chat_llama3)
