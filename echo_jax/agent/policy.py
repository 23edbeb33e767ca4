"""The agent's side of the closed loop: parsing a generated call, loading a run's model, and
teacher-forced tool-call accuracy. The episodes themselves run in the rollout engine
(`echo_jax.agent.rollout`).

Text that is no call becomes an invalid action for the harness (`PARSE_ERROR_KEY`), which
records the world's own error observation, as for any behaviour policy; an unknown tool goes to
the world, which answers "Unknown tool".
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Sharding

from echo_jax.agent.decoding import Decoder
from echo_jax.config import Config, ModelConfig
from echo_jax.data import chat, render, roles
from echo_jax.data.episodes import Episode, Step
from echo_jax.data.hf_tokenizer import HFVocab
from echo_jax.data.packing import to_compact
from echo_jax.data.render import Rendered
from echo_jax.data.vocab import Vocab, load_vocab
from echo_jax.model.hf_config import read_config
from echo_jax.model.hf_io import abstract_decoder, is_hf_folder, load_hf
from echo_jax.model.transformer import Transformer
from echo_jax.train.run_dir import RunDir
from echo_jax.train.trainer import init_state, make_optimizer

POLICY_KEY = "policy"  # Step key under which the rollout engine stores a generated call's record.


class ActionParseError(ValueError):
    """Generated text that is not one well-formed tool call; the message says why."""


def parse_action(text: str, layout: ModuleType = render) -> dict[str, Any]:
    """Generated call text (up to its closing marker) -> {"tool_name", "arguments"}.

    The format is the layout's `render_action`: one JSON object with a non-empty string name
    (`layout.NAME_KEY`) and an object of arguments (`layout.ARGS_KEY`), then `layout.PARSE_END`
    (data.render: <|end_call|>; data.chat: Qwen3's </tool_call>; data.chat_llama3:
    <|eot_id|>). Raises ActionParseError otherwise.
    """
    return _parse_call(text, layout.PARSE_END, layout.NAME_KEY, layout.ARGS_KEY)


def parse_chat_action(text: str) -> dict[str, Any]:
    """`parse_action` in the chat layout (Qwen3's `<tool_call>` JSON)."""
    return parse_action(text, chat)


def _parse_call(text: str, end_mark: str, name_key: str, args_key: str) -> dict[str, Any]:
    end = text.find(end_mark)
    if end < 0:
        raise ActionParseError(f"the call was not closed with {end_mark.strip()}")
    body = text[:end]
    try:
        call = json.loads(body)
    except json.JSONDecodeError as e:
        why = f"the call is not valid JSON ({e.msg} at character {e.pos})"
        raise ActionParseError(why) from None
    if not isinstance(call, dict):
        raise ActionParseError(f"the call must be a JSON object, got {type(call).__name__}")
    extra = sorted(set(call) - {name_key, args_key})
    if extra:
        raise ActionParseError(f"the call has unexpected keys {extra}")
    name, arguments = call.get(name_key), call.get(args_key, {})
    if not isinstance(name, str) or not name:
        raise ActionParseError(f"the call needs a non-empty string {name_key!r}")
    if not isinstance(arguments, dict):
        raise ActionParseError(f"the call's {args_key!r} must be a JSON object")
    return {"tool_name": name, "arguments": arguments}


def as_step(step: Step | dict[str, Any]) -> Step:
    """A harness step dict ({"action", "observation"}) or an episode Step, as a Step."""
    if isinstance(step, Step):
        return step
    action = step["action"]
    return Step(
        tool_name=action["tool_name"],
        arguments=action.get("arguments", {}),
        observation=step["observation"],
    )


def build_prompt(
    task: str,
    tools: Sequence[str],
    steps: Sequence[Step | dict[str, Any]],
    vocab: Vocab,
    max_prompt_len: int,
    canonical_json: bool = False,
) -> tuple[np.ndarray, bool]:
    """Compact ids of the episode so far plus the next call marker, and whether history was cut.

    When it is longer than max_prompt_len, the CONTEXT prefix is kept and the body starts at the
    earliest step that fits (the last step cut from the left if even it alone does not).
    """
    episode = Episode(
        scenario="",
        task=task,
        task_idx=0,
        tools=tuple(tools),
        steps=tuple(as_step(s) for s in steps),
        reward=0.0,
        source="agent",
    )
    layout = vocab.layout
    rendered = layout.render_episode(episode, canonical_json)
    rendered = Rendered(
        segments=(*rendered.segments, (layout.CALL_MARK, roles.CONTEXT)),
        prefix_segments=rendered.prefix_segments,
        step_starts=(*rendered.step_starts, len(rendered.segments)),
    )
    compact = to_compact(vocab.tokenize(rendered), vocab)
    ids, n, prefix = compact.ids, compact.ids.size, compact.prefix_len
    if n <= max_prompt_len:
        return ids, False
    room = max_prompt_len - prefix
    marker = n - int(compact.step_starts[-1])  # Tokens of the final call marker.
    if room < marker:
        raise ValueError(
            f"the task and tool list take {prefix} tokens; with the call marker they do not fit "
            f"a prompt of {max_prompt_len} (max_len minus max_new_tokens)"
        )
    fitting = [int(s) for s in compact.step_starts if n - s <= room]
    start = fitting[0] if fitting else n - room
    return np.concatenate([ids[:prefix], ids[start:]]), True


def load_run(
    workdir: str | os.PathLike, step: int | None = None, sharding: Sharding | None = None
) -> tuple[Config, Vocab, Any, Any, int]:
    """(config, vocab, graphdef, params, checkpoint step) of a training run's latest (or given)
    checkpoint, or of a Hugging Face checkpoint folder (step 0, default run settings). Nothing
    is initialised: the restore template is shapes only, each array laid out by `sharding` if
    given (a run as several processes: replicated over all of them)."""
    if is_hf_folder(workdir):  # A checkpoint folder itself: the run settings' defaults.
        cfg = Config(model=ModelConfig(hf_path=os.path.abspath(workdir)))
        _, graphdef, params = load_hf(workdir, cfg.model.dtype, cfg.model.attention, sharding)
        return cfg, HFVocab(workdir), graphdef, params, 0
    run = RunDir(workdir)
    with open(run.file(RunDir.CONFIG)) as f:
        cfg = Config.from_dict(json.load(f))
    vocab = load_vocab(run.file(RunDir.VOCAB))
    step = run.latest_checkpoint_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{run.checkpoint_dir} holds no checkpoint")
    tx = make_optimizer(cfg.train)
    graphdef, template = _abstract_model(cfg, vocab.size)
    abstract = jax.eval_shape(lambda p: init_state(p, tx), template)
    if sharding is not None:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                                abstract)  # fmt: skip
    state, _ = run.restore(abstract, step)
    return cfg, vocab, graphdef, state.params, step


def _abstract_model(cfg: Config, vocab_size: int) -> tuple[Any, Any]:
    """The model's graph and its parameters' shapes, without running any initialiser."""
    if cfg.model.hf_path:
        return abstract_decoder(hf_model_config(cfg), cfg.model.attention)
    abstract = nnx.eval_shape(lambda: Transformer(cfg.model, vocab_size, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    return graphdef, nnx.to_pure_dict(state)


def hf_model_config(cfg: Config):
    """The HFConfig of a run from a checkpoint folder, computing in the run's dtype."""
    return read_config(cfg.model.hf_path, cfg.model.dtype)


def _same_call(parsed: dict[str, Any], step: Step) -> tuple[bool, bool]:
    name_ok = parsed["tool_name"] == step.tool_name
    return name_ok, name_ok and parsed["arguments"] == step.arguments


def tool_call_accuracy(
    decoder: Decoder,
    episodes: Sequence[Episode],
    *,
    success_reward: float = 1.0,
    batch_size: int = 8,
    max_positions: int | None = None,
    canonical_json: bool = False,
) -> dict[str, float]:
    """Teacher-forced greedy calls at every action position of the successful episodes.

    Each position's prompt is the recorded history before it (windowed like the agent's); the
    greedy call is parsed and compared with the recorded one, tool name and arguments as parsed
    JSON values. Returns shares over positions: tool_name_acc, call_acc (name and arguments),
    parse_error_rate, and positions.
    """
    max_prompt_len = decoder.max_len - decoder.max_new_tokens
    positions = [
        (ep, i) for ep in episodes if ep.reward >= success_reward for i in range(len(ep.steps))
    ]
    if max_positions is not None:
        positions = positions[:max_positions]
    names = calls = errors = 0
    for lo in range(0, len(positions), batch_size):
        chunk = positions[lo : lo + batch_size]
        prompts = [
            build_prompt(
                ep.task, ep.tools, ep.steps[:i], decoder.vocab, max_prompt_len, canonical_json
            )[0]
            for ep, i in chunk
        ]
        prompts += [prompts[0]] * (batch_size - len(prompts))  # One shape, one compilation.
        gens = decoder.generate(prompts, jax.random.key(0), temperature=0.0)
        for (ep, i), gen in zip(chunk, gens, strict=False):
            try:
                parsed = parse_action(gen.text, decoder.vocab.layout)
                name_ok, call_ok = _same_call(parsed, ep.steps[i])
            except ActionParseError:
                errors += 1
                continue
            names += name_ok
            calls += call_ok
    n = len(positions)
    return {
        "positions": n,
        "tool_name_acc": names / n if n else float("nan"),
        "call_acc": calls / n if n else float("nan"),
        "parse_error_rate": errors / n if n else float("nan"),
    }
