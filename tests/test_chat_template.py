"""A checkpoint's own chat template (echo_jax.data.chat_template): rendered here as
`transformers` renders it (against the text it stored for a corpus episode), accepted where it
renders episodes as the chat layout does, and refused, naming the folder and the first
differing character, where it does not, before any tokenizer is used."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest

from echo_jax.data.chat import render_chat
from echo_jax.data.chat_template import (
    PROBE,
    TEMPLATE_FILE,
    ChatTemplateError,
    check_chat_template,
    read_template,
    render_template,
)
from echo_jax.data.hf_tokenizer import HFVocab
from tests.test_hf_chat import FOLDER, HERE, corpus

TEMPLATE = read_template(FOLDER)


def _folder(tmp_path, template: str | None):
    """The tiny Qwen3 checkpoint's tokenizer files with another chat template (or none)."""
    folder = tmp_path / "ckpt"
    shutil.copytree(FOLDER, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    os.remove(folder / TEMPLATE_FILE)
    if template is not None:
        (folder / TEMPLATE_FILE).write_text(template)
    return str(folder)


def test_the_template_renders_here_as_transformers_rendered_it():
    """The stored reference is `transformers`' apply_chat_template of a corpus episode, whole
    and as the prompt before its first call."""
    with open(os.path.join(HERE, "chat_reference.json")) as f:
        ref = json.load(f)
    episode = next(ep for ep in corpus() if ep.source.split(":")[0].endswith(ref["episode"]))
    assert render_template(TEMPLATE, episode) == ref["text"]
    assert render_template(TEMPLATE, episode, calls=0) == ref["prompt"]


def test_the_fixtures_templates_are_accepted_and_the_probe_covers_every_field():
    check_chat_template(FOLDER)
    check_chat_template(os.path.join(HERE, "tiny-llama"))
    HFVocab(FOLDER)
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


def test_a_template_of_another_layout_is_refused_when_the_vocabulary_loads(tmp_path):
    folder = _folder(tmp_path, LLAMA3_STYLE)
    # "<|start_header_id|>" against "<|im_start|>system": the third character.
    with pytest.raises(ChatTemplateError, match=f"{folder}: .* the episode .* at character 2:"):
        HFVocab(folder)


def _edited(old: str, new: str) -> str:
    assert TEMPLATE.count(old) == 1
    return TEMPLATE.replace(old, new)


def test_one_character_off_is_refused_at_that_character(tmp_path):
    """The tool results' opening tag without its newline: the first tool response's newline
    is where the texts part."""
    edited = _edited("'\\n<tool_response>\\n'", "'\\n<tool_response>'")
    at = render_chat(PROBE).text.index("<tool_response>\n") + len("<tool_response>")
    with pytest.raises(ChatTemplateError, match=f"renders the episode .* at character {at}:"):
        check_chat_template(_folder(tmp_path, edited))


def test_a_generation_prompt_of_its_own_is_refused(tmp_path):
    """Qwen3's empty thinking block after the generation prompt: the episode renders alike,
    the prompt before the first call goes on where the layout's ends."""
    gen = "<|im_start|>assistant\n"
    edited = _edited(
        "'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n'"
    )
    assert render_template(edited, PROBE) == render_chat(PROBE).text
    at = render_chat(PROBE).text.index(gen) + len(gen)
    with pytest.raises(ChatTemplateError, match=f"the prompt before call 0 .* at character {at}:"):
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
