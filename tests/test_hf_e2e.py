"""Hugging Face checkpoints (the tiny random Qwen3 and Llama fixtures) through the rollout engine
and the training entry point: each family's chat layout and tokenizer end to end."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from echo_jax.agent.rollout import EngineConfig, EpisodeRequest, RolloutEngine
from echo_jax.agent.rollout_rows import EPISODE_ROWS, RecordingPolicy
from echo_jax.awm.harness import run_episode
from echo_jax.config import Config, DataConfig, EvalConfig, ModelConfig, TrainConfig
from echo_jax.data import roles
from echo_jax.data.episodes import parse_episode
from echo_jax.data.hf_tokenizer import HFVocab
from echo_jax.model.hf_io import load_hf
from echo_jax.rl.update import make_score_fn
from echo_jax.train.trainer import HF_EXPORT, run_experiment
from tests.test_rollout import FakeEngine
from tests.test_rollout import live as live  # noqa: F401  (fixture)
from tests.test_rollout import world as world  # noqa: F401  (fixture)

HF = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
QWEN = os.path.join(HF, "tiny-qwen3")
A = roles.ACTION


@pytest.fixture(scope="module", params=["tiny-qwen3", "tiny-llama"])
def vocab(request):
    return HFVocab(os.path.join(HF, request.param))


def test_rows_are_the_chat_rendering_of_the_episode(live, world, vocab):
    """Canned calls in the family's format through the harness: the row the engine recorded
    decodes to exactly the layout's rendering of the resulting episode (what offline training
    would read), and an unclosed call is a parse error naming the layout's closing mark."""
    chat = vocab.layout
    texts = [
        chat.render_action("get_item", {"item_id": 1}),
        chat.render_action("create_order", {"item_id": 1, "quantity": 2}),
        chat.render_action("verify", {"verifier_mode": "code"}),
    ]
    engine = FakeEngine(vocab, world, *texts)
    tools = [t["name"] for t in live.client.list_tools()]
    policy = RecordingPolicy(engine, 0, EpisodeRequest("tiny_shop", 0, seed=0), tools)
    ep = policy.finish(run_episode(live.server, live.client, world, 0, policy))
    assert ep["step_reward_types"] == ["tool_call_ok", "tool_call_ok", "complete"]
    (row,) = ep[EPISODE_ROWS]
    rendered = chat.render_chat(parse_episode(json.loads(json.dumps(ep)), "roundtrip"))
    assert vocab.decode(np.array(row["tokens"])) == rendered.text
    # Tokenized in pieces as the engine feeds them, the same ids as the whole text's.
    assert row["tokens"] == vocab.encode_text(rendered.text).tolist()
    want_roles = vocab.tokenize(rendered).roles.tolist()
    assert row["roles"] == want_roles

    unclosed = texts[0][: -len(chat.END_CALL)]
    engine = FakeEngine(vocab, world, unclosed, *texts[1:])
    policy = RecordingPolicy(engine, 0, EpisodeRequest("tiny_shop", 0, seed=0), tools)
    ep = policy.finish(run_episode(live.server, live.client, world, 0, policy))
    closing = chat.PARSE_END.strip()  # </tool_call>, <|eot_id|>
    assert f"not closed with {closing}" in ep["steps"][0]["observation"]["error"]
    (row,) = ep[EPISODE_ROWS]  # The turn is closed after the cut call, as CONTEXT.
    text = vocab.decode(np.array(row["tokens"]))
    opening = chat.render_observation(ep["steps"][0]["observation"])[0][0]
    assert unclosed + chat.END_TURN + opening in text


def test_engine_rows_reproduce_the_sampling_logprobs(world, vocab):
    """A random checkpoint sampling in the tiny world: every sampled token's recorded log-prob
    is the training forward pass's over the recorded row (the RL update's logp_gap)."""
    _, graphdef, params = load_hf(vocab.folder, attention="xla")
    max_len = 512
    config = EngineConfig(slots=2, max_new_tokens=16, max_steps=2, decode_block=8)
    requests = [EpisodeRequest(world.name, 0, seed=s, temperature=1.0) for s in range(2)]
    with RolloutEngine(graphdef, params, vocab, max_len, {world.name: world}, config) as engine:
        episodes = engine.run(requests)
        generated = engine.timing.generated_tokens
    score = make_score_fn(graphdef, "plain", 512)
    gaps = []
    for ep in episodes:
        for row in ep[EPISODE_ROWS]:
            n = len(row["tokens"])
            tokens = np.zeros((1, max_len), np.int32)
            tokens[0, :n] = row["tokens"]
            logp = np.asarray(score(params, tokens))[0, : n - 1]
            action = np.array(row["roles"][1:]) == A
            gaps.append(np.abs(logp[action] - np.array(row["logp"][1:])[action]))
    gaps = np.concatenate(gaps)
    assert gaps.size == generated > 0
    assert gaps.max() < 1e-4


def test_train_from_a_checkpoint_folder_and_back_out(tmp_path):
    """`experiments.train --model=PATH` in small: two ECHO steps on one shard, then the run's
    hf/ folder is a checkpoint that loads, with the trained (changed) weights."""
    cfg = Config(
        model=ModelConfig(hf_path=QWEN, attention="xla"),
        data=DataConfig(paths=("data/corpus/episodes/clinic_101.jsonl.gz",), max_len=768),
        train=TrainConfig(steps=2, batch_size=2, log_every=1, checkpoint_every=2),
        eval=EvalConfig(splits=()),
    )
    summary = run_experiment(cfg, str(tmp_path / "run"), log=lambda *_: None)
    assert summary["data"]["straddles"] == 0 and summary["data"]["kept_action"] > 0
    assert np.isfinite(summary["final"]["loss"])
    _, _, before = load_hf(QWEN)
    _, _, after = load_hf(tmp_path / "run" / HF_EXPORT)
    diff = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in
            zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)]  # fmt: skip
    assert max(diff) > 0
    with open(tmp_path / "run" / "vocab.json") as f:
        assert json.load(f)["hf_path"] == os.path.abspath(QWEN)
