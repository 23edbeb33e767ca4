"""The closed-loop agent: call parsing, prompts, tool-call accuracy and a whole evaluation."""

import gzip
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from echo_jax.agent.closed_loop import evaluate_checkpoint, pass_at_k, split_tasks, summarize
from echo_jax.agent.decoding import Decoder, Generation, decode_text
from echo_jax.agent.policy import (
    ActionParseError,
    build_prompt,
    load_run,
    parse_action,
    tool_call_accuracy,
)
from echo_jax.awm.world_format import load_worlds
from echo_jax.config import AgentConfig, Config, DataConfig, ModelConfig
from echo_jax.data.episode_files import load_episodes
from echo_jax.data.episodes import parse_episode
from echo_jax.data.packing import to_compact
from echo_jax.data.render import CALL_MARK, END_CALL, render_action, render_episode
from echo_jax.data.tokenizer import encoding, tokenize_rendered
from echo_jax.data.vocab import build_vocab
from echo_jax.train.run_dir import RunDir
from echo_jax.train.trainer import init_state, make_optimizer
from tests.test_data import small_episode
from tests.test_decoding import random_model

WORLDS = Path(__file__).parent / "awm" / "fixtures" / "tiny_world"
TINY = ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32)
MAX_LEN, MAX_NEW = 512, 12


def call_text(tool_name, **arguments):
    return render_action(tool_name, arguments)


# --- parsing --------------------------------------------------------------------------------


def test_parse_valid_call():
    assert parse_action(call_text("get_item", item_id=1)) == {
        "tool_name": "get_item",
        "arguments": {"item_id": 1},
    }
    assert parse_action('{"tool_name": "verify"}' + END_CALL)["arguments"] == {}


def test_parse_unknown_tool_is_the_worlds_business():
    assert parse_action(call_text("no_such_tool"))["tool_name"] == "no_such_tool"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('{"tool_name": "get_item", "arguments": {"item_id": 1}' + END_CALL, "not valid JSON"),
        ('{"tool_name": "get_item", "arguments": {}}', "not closed"),
        ("[1, 2]" + END_CALL, "must be a JSON object"),
        ('{"arguments": {}}' + END_CALL, "non-empty string 'tool_name'"),
        ('{"tool_name": "x", "arguments": [1]}' + END_CALL, "must be a JSON object"),
        ('{"tool_name": "x", "arguments": {}, "why": 1}' + END_CALL, "unexpected keys"),
    ],
)
def test_parse_errors_say_why(text, why):
    with pytest.raises(ActionParseError, match=why):
        parse_action(text)


# --- prompts --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def episode():
    return parse_episode(small_episode(), "test")


@pytest.fixture(scope="module")
def vocab(episode):
    world_text = "".join(p.read_text() for p in sorted(WORLDS.glob("*.jsonl")))
    streams = [tokenize_rendered(render_episode(episode)).ids]
    streams.append(np.asarray(encoding().encode_ordinary(world_text), np.int32))
    return build_vocab(streams, 600)


def test_prompt_is_the_training_tokens_up_to_the_call(episode, vocab):
    full = to_compact(tokenize_rendered(render_episode(episode)), vocab)
    marker = vocab.encode_text(CALL_MARK).size
    for i in range(len(episode.steps)):
        prompt, cut = build_prompt(episode.task, episode.tools, episode.steps[:i], vocab, 10_000)
        np.testing.assert_array_equal(prompt, full.ids[: full.step_starts[i] + marker])
        assert not cut


def test_long_history_keeps_the_prefix_and_the_latest_steps(episode, vocab):
    steps = episode.steps * 4
    whole, _ = build_prompt(episode.task, episode.tools, steps, vocab, 10_000)
    prefix = to_compact(tokenize_rendered(render_episode(episode)), vocab).prefix_len
    for limit in (whole.size - 1, prefix + 60, prefix + 5):
        prompt, cut = build_prompt(episode.task, episode.tools, steps, vocab, limit)
        assert cut and prompt.size <= limit
        np.testing.assert_array_equal(prompt[:prefix], whole[:prefix])
        np.testing.assert_array_equal(prompt[prefix:], whole[whole.size - (prompt.size - prefix) :])
        text = decode_text(vocab, prompt[prefix:])
        assert text.endswith(CALL_MARK)
        if limit > prefix + 5:
            assert text.startswith(CALL_MARK)  # Cut at a step start, as training windows are.
    with pytest.raises(ValueError, match="do not fit"):
        build_prompt(episode.task, episode.tools, steps, vocab, prefix + 1)


@pytest.fixture(scope="module")
def world():
    return load_worlds(WORLDS, ["tiny_shop"])["tiny_shop"]


@pytest.fixture(scope="module")
def model(vocab):
    cfg = Config(model=TINY, data=DataConfig(paths=("unused",), max_len=MAX_LEN))
    return (cfg, *random_model(TINY, vocab.size))


@pytest.fixture(scope="module")
def decoder(model, vocab):
    _, graphdef, params = model
    return Decoder(graphdef, params, vocab, MAX_LEN, MAX_NEW)


def test_tool_call_accuracy(episode, vocab, decoder):
    class Oracle:
        """Answers the recorded call of the step the prompt asks for (or a wrong one)."""

        def __init__(self, wrong_args):
            self.vocab, self.max_len, self.max_new_tokens = vocab, MAX_LEN, MAX_NEW
            self.wrong_args = wrong_args

        def generate(self, prompts, key, temperature=0.0, top_p=1.0):
            out = []
            for p in prompts:
                step = episode.steps[decode_text(vocab, p).count(CALL_MARK) - 1]
                args = {"x": 1} if self.wrong_args else step.arguments
                text = call_text(step.tool_name, **args)
                out.append(Generation(p[:0], np.zeros(0), np.zeros(0), text, True, p.size))
            return out

    failed = parse_episode(small_episode(reward=0.0), "failed")
    right = tool_call_accuracy(Oracle(False), [episode, failed], batch_size=3)
    assert right == {"positions": 2, "tool_name_acc": 1.0, "call_acc": 1.0, "parse_error_rate": 0}
    wrong = tool_call_accuracy(Oracle(True), [episode], batch_size=3)
    assert wrong["tool_name_acc"] == 1.0 and wrong["call_acc"] == 0.0
    real = tool_call_accuracy(decoder, [episode], batch_size=1)
    assert real["positions"] == 2 and real["parse_error_rate"] == 1.0  # Random model.


# --- evaluation -----------------------------------------------------------------------------


def test_pass_at_k():
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 4, 3) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9)  # 1 - C(3,3)/C(5,3)
    assert pass_at_k(5, 3, 3) == 1.0  # n - c < k: every draw of k holds a hit


def test_split_tasks_follow_the_corpus_manifest(tmp_path):
    worlds = load_worlds(WORLDS)
    assert len(split_tasks(worlds, None, "train")) == 4
    manifest = {
        "splits": {"heldout_scenarios": ["tiny_shop_two"], "heldout_tasks": {"tiny_shop": [1]}},
        "counts": {"tiny_shop": {}, "tiny_shop_two": {}},
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert split_tasks(worlds, str(tmp_path), "train") == [("tiny_shop", 0)]
    assert split_tasks(worlds, str(tmp_path), "heldout_tasks") == [("tiny_shop", 1)]
    assert split_tasks(worlds, str(tmp_path), "heldout_scenarios") == [
        ("tiny_shop_two", 0),
        ("tiny_shop_two", 1),
    ]


def test_evaluate_checkpoint_writes_rescorable_rollouts(tmp_path, model, vocab):
    cfg, _, params = model
    workdir = tmp_path / "run"
    run = RunDir.open(workdir, cfg, resume=False)
    run.claim()
    vocab.save(run.file(RunDir.VOCAB))
    run.save(init_state(params, make_optimizer(cfg.train)), 3, {"data_position": 0, "seed": 0})
    _, loaded_vocab, _, loaded, step = load_run(workdir)
    assert step == 3 and loaded_vocab.size == vocab.size
    pairs = zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True)
    assert all(np.array_equal(a, b) for a, b in pairs)

    agent = AgentConfig(temperature=1.0, max_new_tokens=MAX_NEW, max_steps=1)
    metrics = evaluate_checkpoint(
        str(workdir),
        "train",
        2,
        worlds=str(WORLDS),
        corpus_dir=None,
        agent=agent,
        max_tasks=1,
        scenarios=["tiny_shop"],
        tool_call_positions=0,
    )
    assert metrics["checkpoint_step"] == 3 and metrics["tasks"] == 1
    assert metrics["episodes"] == 3  # Greedy + 2 samples.
    assert metrics["pass@1_greedy"] == metrics["pass@1"] == metrics["pass@2"] == 0.0
    assert metrics["mean_steps"] == 2.0  # One unparsable call, then the forced verify.
    assert metrics["format_error_share"] == 0.5
    assert metrics["decode_tokens_per_s"] > 0
    rollouts = metrics["rollouts"]
    assert rollouts.startswith(str(workdir / "closed_loop" / "train_step3"))
    episodes = load_episodes([rollouts])
    assert len(episodes) == 3 and all(ep.extras["agent"]["step"] == 3 for ep in episodes)
    with gzip.open(rollouts, "rt") as f:
        records = [json.loads(line) for line in f]
    rescored = summarize(records, 2)
    assert all(rescored[k] == metrics[k] for k in rescored)
    assert json.loads((Path(rollouts).parent / "metrics.json").read_text()) == metrics
