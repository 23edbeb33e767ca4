"""The rollout engine: calls through the harness, token-exact rows, and independence from
batching."""

import json
import time
import types

import numpy as np
import pytest

from echo_jax.agent.decoding import Generation, decode_text
from echo_jax.agent.policy import POLICY_KEY
from echo_jax.agent.rollout import (
    EngineConfig,
    EpisodeRequest,
    RolloutEngine,
    next_extend,
    world_pool,
)
from echo_jax.agent.rollout_rows import (
    EPISODE_ROWS,
    EpisodeTokens,
    RecordingPolicy,
    segments_to_tokens,
)
from echo_jax.awm.harness import run_episode
from echo_jax.awm.live_world import LiveWorld
from echo_jax.awm.world_format import load_worlds
from echo_jax.data import roles
from echo_jax.data.episodes import parse_episode
from echo_jax.data.render import CALL_MARK, END_CALL, render_prefix
from echo_jax.rl.update import make_score_fn
from echo_jax.util.choices import ConfigError
from tests.test_agent import TINY, WORLDS, call_text
from tests.test_agent import episode as episode  # noqa: F401  (fixture)
from tests.test_agent import vocab as vocab  # noqa: F401  (fixture)
from tests.test_decoding import random_model

C, A, E, W = roles.CONTEXT, roles.ACTION, roles.ENV_OUTPUT, roles.WARNING


@pytest.fixture(scope="module")
def world():
    return load_worlds(WORLDS, ["tiny_shop"])["tiny_shop"]


@pytest.fixture(scope="module")
def live(world):
    live = LiveWorld(world, timeout_s=10)
    live.open()
    yield live
    live.close()


# --- rows of one episode ---------------------------------------------------------------------


def test_a_new_row_restarts_with_the_prefix_and_recent_whole_steps():
    trace = EpisodeTokens(prefix=[1, 2], max_len=10)
    assert trace.append([3], [C], [0], budget=8) == [1, 2, 3]  # The first row.
    trace.start_step(1)
    trace.rows[-1].extend([4, 5], [A, A])
    trace.stream += [4, 5]
    assert trace.append([6, 7, 8], [E, E, C], [1, 1, 0], budget=8) is None  # Fits: 8 tokens.
    trace.start_step(1)
    trace.rows[-1].extend([9], [A])
    trace.stream += [9]
    # 9 + 3 > 8: a new row, the prefix, then the latest step that fits (marker 8, action 9).
    assert trace.append([10, 11, 12], [E, E, C], [1, 1, 0], budget=8) == [1, 2, 8, 9, 10, 11, 12]
    assert trace.rows[-1].roles == [C, C, C, C, E, E, C]  # Repeated tokens are no targets.
    # An extension longer than the room left keeps its end (the next call marker).
    trace.start_step(1)
    new = trace.append([13, 14, 15, 16, 17, 18, 19], [E] * 6 + [C], [1] * 6 + [0], budget=8)
    assert new == [1, 2, 14, 15, 16, 17, 18, 19] and trace.dropped_targets == 1


def test_an_extend_call_takes_the_widest_rows_and_pads_no_row():
    """A row costs an extend about what its tokens cost, so three rows of the widest chunk go
    as two and then one, not as four with a padded row."""
    waiting = {0: 40, 3: 200, 5: 150, 6: 250, 9: 10}  # Widths 128, 256, 256, 256, 32.
    assert next_extend(waiting, (1, 2, 4)) == (256, [3, 5])
    assert next_extend({6: 250, 0: 40, 9: 10}, (1, 2, 4)) == (256, [6])
    assert next_extend({0: 40, 9: 10}, (1, 2, 4)) == (128, [0])
    assert next_extend({s: 20 for s in range(7)}, (1, 2, 4, 8)) == (32, [0, 1, 2, 3])
    assert next_extend({0: 900}, (1, 2)) == (256, [0])  # Longer than a chunk: 256 at a time.


class FakeEngine:
    """What `RecordingPolicy` needs of the engine, answering each call with canned text."""

    def __init__(self, vocab, world, *texts):
        self.vocab, self.texts, self.fed = vocab, list(texts), []
        self.canonical_json = False
        self.config = EngineConfig(max_new_tokens=12)
        self.decoder = types.SimpleNamespace(max_len=4096)
        self.worlds = {world.name: world}

    def generate(self, policy, tokens, start=None):
        self.fed.append((list(tokens), start))
        text = self.texts[len(self.fed) - 1]
        ids = self.vocab.encode_text(text)
        logp = -np.arange(1, ids.size + 1, dtype=np.float32) / 10
        return Generation(ids, logp, logp, text, END_CALL in text, 0)


def test_calls_go_through_the_harness_and_rows_hold_exactly_what_was_fed(live, world, vocab):
    engine = FakeEngine(
        vocab,
        world,
        call_text("get_item", item_id=1),
        '{"tool_name": "get_item", "arguments": {"item_id": 1}' + END_CALL,  # Malformed.
        call_text("no_such_tool"),
        '{"tool_name": "get_item", "argu',  # Budget ran out before the marker.
        call_text("create_order", item_id=1, quantity=2),
        call_text("verify", verifier_mode="code"),
    )
    tools = [t["name"] for t in live.client.list_tools()]
    policy = RecordingPolicy(engine, 0, EpisodeRequest("tiny_shop", 0, seed=0), tools)
    ep = policy.finish(run_episode(live.server, live.client, world, 0, policy))
    assert ep["step_reward_types"] == [
        "tool_call_ok", "invalid_action", "tool_not_found", "invalid_action", "tool_call_ok",
        "complete",
    ]  # fmt: skip
    obs = [s["observation"] for s in ep["steps"]]
    assert obs[1]["error"].startswith("Invalid action: unparsable call: the call is not valid JSON")
    assert obs[2]["error"].startswith("Unknown tool")  # The server's own text.
    assert obs[3]["error"] == (
        "Invalid action: unparsable call: the call was not closed with <|end_call|>"
    )
    assert "verify_result" in obs[-1] and ep["reward"] == 1.0
    assert ep["steps"][1][POLICY_KEY]["parse_error"].startswith("the call is not valid JSON")
    assert parse_episode(json.loads(json.dumps(ep)), "roundtrip").reward == 1.0

    # One row; it is what was fed, then sampled, call after call, then the unread verdict.
    (row,) = ep[EPISODE_ROWS]
    fed_then_sampled = []
    for (tokens, _), text in zip(engine.fed, engine.texts, strict=True):
        fed_then_sampled += tokens + vocab.encode_text(text).tolist()
    assert row["tokens"][: len(fed_then_sampled)] == fed_then_sampled
    assert [start for _, start in engine.fed] == [0] + [None] * 5  # One row, written once.
    prefix, _, _ = segments_to_tokens(render_prefix(world.tasks[0], tools), vocab)
    assert engine.fed[0][0][: len(prefix)] == prefix
    # The model read each observation, rendered by the one renderer, before its next call.
    second = vocab.decode(np.array(engine.fed[1][0]))
    assert second == "<|result|>\n" + obs[0]["tool_result"] + "\n" + CALL_MARK
    assert vocab.decode(np.array(engine.fed[4][0])).startswith("\n<|error|>")  # Unclosed call.
    # Sampled tokens are the ACTION targets, with the sampler's log-probs; the rest record 0.
    roles_ = np.array(row["roles"])
    logp = np.array(row["logp"])
    sampled = np.concatenate([vocab.encode_text(t) for t in engine.texts])
    np.testing.assert_array_equal(np.array(row["tokens"])[roles_ == A], sampled)
    assert np.all(logp[roles_ != A] == 0) and np.all(logp[roles_ == A] < 0)
    # The verifier's verdict, which no call read, ends the row as an env target.
    tail = vocab.decode(np.array(row["tokens"][len(fed_then_sampled) :]))
    assert tail.startswith("<|verify|>\n") and roles_[-1] == E


# --- the engine with a model ---------------------------------------------------------------


MAX_LEN = 160  # Small: histories overflow the row, so episodes span several rows.


@pytest.fixture(scope="module")
def model(vocab):
    return random_model(TINY, vocab.size)


def run_engine(model, vocab, world, requests, slots):
    graphdef, params = model
    config = EngineConfig(slots=slots, max_new_tokens=12, max_steps=4, decode_block=5)
    with RolloutEngine(graphdef, params, vocab, MAX_LEN, {world.name: world}, config) as engine:
        return engine.run(requests), engine.timing


def requests_for(world):
    return [
        EpisodeRequest(world.name, t, seed=10 + t + 7 * k, temperature=0.0 if k == 0 else 1.0)
        for t in range(len(world.tasks))
        for k in range(2)
    ]


@pytest.fixture(scope="module")
def rollouts(model, vocab, world):
    return run_engine(model, vocab, world, requests_for(world), slots=3)


def test_rows_reproduce_every_recorded_sampling_logprob(rollouts, model, vocab):
    episodes, timing = rollouts
    graphdef, params = model
    score = make_score_fn(graphdef, "plain", 512)
    spans = [len(ep[EPISODE_ROWS]) for ep in episodes]
    assert max(spans) > 1  # Histories were cut: later steps' prompts started new rows.
    gaps = []
    for ep in episodes:
        for row in ep[EPISODE_ROWS]:
            n = len(row["tokens"])
            assert n <= MAX_LEN
            tokens = np.zeros((1, MAX_LEN), np.int32)
            tokens[0, :n] = row["tokens"]
            logp = np.asarray(score(params, tokens))[0, : n - 1]
            action = np.array(row["roles"][1:]) == A
            gaps.append(np.abs(logp[action] - np.array(row["logp"][1:])[action]))
    gaps = np.concatenate(gaps)
    assert gaps.size == timing.generated_tokens  # Every sampled token is in exactly one row.
    assert gaps.max() < 1e-4


def test_each_call_sees_the_tokens_of_its_row(rollouts, vocab):
    """A call's prompt is its row up to the call: the sampled text follows the call marker."""
    episodes, _ = rollouts
    for ep in episodes:
        records = [s[POLICY_KEY] for s in ep["steps"] if POLICY_KEY in s]
        for record in records:
            row = ep[EPISODE_ROWS][record["row"]]
            start = record["prompt_tokens"]
            assert row["tokens"][start : start + len(record["tokens"])] == record["tokens"]
            assert decode_text(vocab, np.array(row["tokens"][:start])).endswith(CALL_MARK)


def test_rollouts_do_not_depend_on_how_many_run_at_once(rollouts, model, vocab, world):
    alone, _ = run_engine(model, vocab, world, requests_for(world)[:3], slots=1)
    for a, b in zip(alone, rollouts[0][:3], strict=True):
        for ra, rb in zip(a[EPISODE_ROWS], b[EPISODE_ROWS], strict=True):
            assert ra["tokens"] == rb["tokens"]
            np.testing.assert_allclose(ra["logp"], rb["logp"], atol=1e-5)
            assert ra["roles"] == rb["roles"] and ra["kinds"] == rb["kinds"]
        assert a["step_reward_types"] == b["step_reward_types"]


def test_a_random_model_ends_in_the_verifiers_decision(rollouts):
    episodes, timing = rollouts
    for ep in episodes:
        last = ep["steps"][-1]
        assert last["observation"]["verify_result"]["execution_status"] == "success"
        assert len(ep["steps"]) <= 5
    assert timing.env_steps == sum(len(ep["steps"]) for ep in episodes)
    assert timing.decode_s > 0 and timing.generated_tokens > 0


def test_a_prestarted_server_serves_the_run_and_counts_as_its_start(model, vocab, world):
    """Prestarting returns at once and leaves the server up for the engine's first episodes;
    the run that uses it counts its start, the next run none."""
    graphdef, params = model
    config = EngineConfig(slots=2, max_new_tokens=12, max_steps=2, decode_block=5,
                          servers_per_scenario=1)  # fmt: skip
    pool = world_pool({world.name: world}, config)
    began = time.perf_counter()
    pool.prestart([world.name, world.name])
    assert time.perf_counter() - began < 0.5  # It does not wait for the start.
    deadline = time.perf_counter() + 60
    while not pool.idle[world.name] and time.perf_counter() < deadline:
        time.sleep(0.05)
    assert pool.started == 1 and len(pool.idle[world.name]) == 1
    engine = RolloutEngine(graphdef, params, vocab, MAX_LEN, {world.name: world}, config,
                           pool=pool)  # fmt: skip
    with engine:
        engine.run(requests_for(world)[:2])
        assert engine.timing.servers_started == 1
        engine.run(requests_for(world)[:1])
        assert engine.timing.servers_started == 0
    assert pool.started == 1


def test_a_task_whose_prompt_cannot_fit_is_a_config_error_naming_it(world, vocab):
    """The task and tool list alone leave no room for max_new_tokens: a ConfigError (what the
    entry points print as one line) naming the task, its prefix's length and what to raise."""
    engine = FakeEngine(vocab, world)
    tools = ["get_item", "create_order", "verify"]
    prefix, _, _ = segments_to_tokens(render_prefix(world.tasks[0], tools), vocab)
    marker = vocab.encode_text(CALL_MARK).size
    engine.decoder.max_len = len(prefix) + marker + engine.config.max_new_tokens  # Just fits.
    RecordingPolicy(engine, 0, EpisodeRequest(world.name, 0, seed=0), tools)
    engine.decoder.max_len -= 1
    with pytest.raises(ConfigError, match=rf"{world.name} task 0: .* take {len(prefix)} tokens"
                       r".*raise max_len"):  # fmt: skip
        RecordingPolicy(engine, 0, EpisodeRequest(world.name, 0, seed=0), tools)
