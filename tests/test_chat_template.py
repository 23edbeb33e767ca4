"""A checkpoint's own chat template (echo_jax.data.chat_template): rendered here as
`transformers` renders it (against the text it stored for a corpus episode), matched to the chat
layout that renders episodes as it does, and refused, naming the folder and each layout's first
differing character, where none does, before any tokenizer is used."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil

import pytest

from echo_jax.data import chat, chat_llama3
from echo_jax.data.chat import render_chat
from echo_jax.data.chat_template import (
    PROBE,
    TEMPLATE_FILE,
    ChatTemplateError,
    _special_tokens,
    check_chat_template,
    read_template,
    render_template,
)
from echo_jax.data.hf_tokenizer import HFVocab
from tests.test_hf_chat import FOLDER, HERE, corpus

TEMPLATE = read_template(FOLDER)
LLAMA = os.path.join(HERE, "tiny-llama")
LAYOUTS = {"tiny-qwen3": chat, "tiny-llama": chat_llama3}


def _folder(tmp_path, template: str | None, source: str = FOLDER):
    """A tiny checkpoint's tokenizer files with another chat template (or none)."""
    folder = tmp_path / "ckpt"
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    os.remove(folder / TEMPLATE_FILE)
    if template is not None:
        (folder / TEMPLATE_FILE).write_text(template)
    return str(folder)


@pytest.mark.parametrize("family", LAYOUTS)
def test_the_template_renders_here_as_transformers_rendered_it(family):
    """The stored reference is `transformers`' apply_chat_template of a corpus episode, whole
    and as the prompt before its first call (with the layout's template variables)."""
    folder = os.path.join(HERE, family)
    with open(os.path.join(HERE, "chat_reference.json")) as f:
        ref = json.load(f)
    episode = next(ep for ep in corpus() if ep.source.split(":")[0].endswith(ref["episode"]))
    variables = _special_tokens(folder) | LAYOUTS[family].TEMPLATE_VARS
    template = read_template(folder)
    assert render_template(template, episode, variables=variables) == ref[family]["text"]
    assert render_template(template, episode, 0, variables) == ref[family]["prompt"]


def test_each_fixture_gets_its_familys_layout_and_the_probe_covers_every_field():
    assert check_chat_template(FOLDER) is chat
    assert check_chat_template(LLAMA) is chat_llama3
    assert HFVocab(FOLDER).layout is chat and HFVocab(LLAMA).layout is chat_llama3
    kinds = {k for step in PROBE.steps for k in step.observation}
    assert kinds == {"tool_result", "error", "verify_result", "warning"}
    assert render_template(TEMPLATE, PROBE) == render_chat(PROBE).text


# A Llama 3-style chat, written for this test: headers and <|eot_id|>, calls as bare JSON.
LLAMA3_STYLE = (
    "{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{%- set role = 'ipython' if m.role == 'tool' else m.role -%}"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' -}}"
    "{%- if m.tool_calls -%}{{- m.tool_calls[0].function | tojson -}}"
    "{%- else -%}{{- m.content -}}{%- endif -%}"
    "{{- '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)


def test_a_template_of_no_layout_is_refused_when_the_vocabulary_loads(tmp_path):
    folder = _folder(tmp_path, LLAMA3_STYLE)
    # "<|start_header_id|>user" against "<|im_start|>system" and against
    # "<|begin_of_text|>" (this folder's bos_token is unset): the third character, both times.
    with pytest.raises(ChatTemplateError) as e:
        HFVocab(folder)
    assert str(e.value).startswith(f"{folder}: ")
    assert "as echo_jax.data.chat (" in str(e.value)
    for layout in ("chat", "chat_llama3"):
        assert re.search(rf"as echo_jax\.data\.{layout} \(.*?\), the episode differs at "
                         "character 2:", str(e.value)), layout  # fmt: skip


def _edited(old: str, new: str) -> str:
    assert TEMPLATE.count(old) == 1
    return TEMPLATE.replace(old, new)


def test_one_character_off_is_refused_at_that_character(tmp_path):
    """The tool results' opening tag without its newline: the first tool response's newline
    is where the texts part."""
    edited = _edited("'\\n<tool_response>\\n'", "'\\n<tool_response>'")
    at = render_chat(PROBE).text.index("<tool_response>\n") + len("<tool_response>")
    with pytest.raises(ChatTemplateError, match=f"the episode differs at character {at}:"):
        check_chat_template(_folder(tmp_path, edited))


def test_a_llama3_template_one_character_off_or_dated_today_is_refused(tmp_path):
    """The tool result's JSON string printed bare (as a template that does not `tojson`
    strings would): refused where the first result starts. A template that ignores
    `date_string` and prints today's date: refused at the date."""
    template = read_template(LLAMA)
    bare = "(message.content | tojson)"
    assert template.count(bare) == 1
    rendered = chat_llama3.render_chat(PROBE).text
    at = rendered.index('"{\\"ok')
    with pytest.raises(
        ChatTemplateError, match=f"chat_llama3 .* the episode differs at character {at}:"
    ):
        check_chat_template(
            _folder(tmp_path / "a", template.replace(bare, "message.content"), LLAMA)
        )
    dated = "date_string if date_string is defined else '26 Jul 2024'"
    assert template.count(dated) == 1
    today = template.replace(dated, "strftime_now('%d %b %Y') + ' (today)'")
    at = rendered.index("26 Jul 2024")
    with pytest.raises(
        ChatTemplateError, match=f"chat_llama3 .* the episode differs at character {at}:"
    ):
        check_chat_template(_folder(tmp_path / "b", today, LLAMA))


def test_a_generation_prompt_of_its_own_is_refused(tmp_path):
    """Qwen3's empty thinking block after the generation prompt: the episode renders alike,
    the prompt before the first call goes on where the layout's ends."""
    gen = "<|im_start|>assistant\n"
    edited = _edited(
        "'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n'"
    )
    assert render_template(edited, PROBE) == render_chat(PROBE).text
    at = render_chat(PROBE).text.index(gen) + len(gen)
    with pytest.raises(
        ChatTemplateError, match=f"the prompt before call 0 differs at character {at}:"
    ):
        check_chat_template(_folder(tmp_path, edited))


def test_a_failing_or_unsafe_template_is_a_clear_error(tmp_path):
    failing = "{{ raise_exception('no tools here') }}"
    with pytest.raises(ChatTemplateError, match="fails on the episode: no tools here"):
        check_chat_template(_folder(tmp_path / "a", failing))
    unsafe = "{{ messages.__class__.__mro__ }}"  # The sandbox refuses attribute escapes.
    with pytest.raises(ChatTemplateError, match="fails on the episode"):
        check_chat_template(_folder(tmp_path / "b", unsafe))


def test_a_checkpoint_without_a_template_gets_the_layout_with_a_warning(tmp_path, caplog):
    folder = _folder(tmp_path, None)
    with caplog.at_level(logging.WARNING):
        check_chat_template(folder)
    assert "has no chat template" in caplog.text
    config = json.loads((tmp_path / "ckpt" / "tokenizer_config.json").read_text())
    (tmp_path / "ckpt" / "tokenizer_config.json").write_text(
        json.dumps(config | {"chat_template": [{"name": "default", "template": LLAMA3_STYLE}]})
    )
    with pytest.raises(ChatTemplateError):  # A named template in tokenizer_config.json counts.
        check_chat_template(folder)
