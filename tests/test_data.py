import gzip
import json
import os

import chex
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from echo_jax.config import DataConfig
from echo_jax.data import roles
from echo_jax.data.dataset import load_packed
from echo_jax.data.episode_files import load_episodes
from echo_jax.data.episodes import EpisodeError
from echo_jax.data.packing import pack, to_compact, tokenize_episodes, window_spans
from echo_jax.data.render import render_episode
from echo_jax.data.tokenizer import tokenize_rendered
from echo_jax.data.vocab import build_vocab

REAL = os.path.join(os.path.dirname(__file__), "..", "data", "awm_e_commerce_33_task0.json")


def small_episode(**overrides):
    ep = {
        "scenario": "shop_1",
        "task": "Buy one apple.",
        "task_idx": 0,
        "tools": ["find", "buy"],
        "steps": [
            {
                "action": {"tool_name": "find", "arguments": {"q": "apple"}},
                "observation": {"tool_name": "find", "tool_result": '{"id": 7, "price": 1.5}'},
            },
            {
                "action": {"tool_name": "buy", "arguments": {"id": "seven"}},
                "observation": {
                    "tool_name": "buy",
                    "error": "422: id must be an integer",
                    "warning": "tool result truncated",
                },
            },
        ],
        "reward": 1.0,
    }
    ep.update(overrides)
    return ep


def write_jsonl(path, records, gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wt") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def real_episode():
    (ep,) = load_episodes([REAL])
    return ep


def test_real_episode_roles_cover_exactly_the_rendered_text(real_episode):
    rendered = render_episode(real_episode)
    tok = tokenize_rendered(rendered)
    assert tok.straddles == 0
    vocab = build_vocab([tok.ids], 8192)
    compact = to_compact(tok, vocab)
    # Decoding the tokens of each role gives back exactly the characters rendered with it.
    for role in (roles.CONTEXT, roles.ACTION, roles.ENV_OUTPUT):
        want = "".join(text for text, r in rendered.segments if r == role)
        assert vocab.decode(compact.ids[compact.roles == role]) == want, roles.NAMES[role]
    assert vocab.decode(compact.ids) == rendered.text
    # Every tool result and the verifier's answer are world output.
    env_text = vocab.decode(compact.ids[compact.roles == roles.ENV_OUTPUT])
    for step in real_episode.steps:
        if "tool_result" in step.observation:
            assert step.observation["tool_result"] in env_text
    assert '"result": "others"' in env_text
    counts = np.bincount(compact.roles, minlength=roles.NUM_ROLES)
    assert counts[roles.ACTION] > 0 and counts[roles.ENV_OUTPUT] > counts[roles.ACTION]


def test_action_role_covers_call_and_closing_marker(real_episode):
    rendered = render_episode(real_episode)
    actions = [text for text, r in rendered.segments if r == roles.ACTION]
    assert len(actions) == len(real_episode.steps)
    first = json.loads(actions[0].split("\n<|end_call|>")[0])
    assert first == {"tool_name": "search_products", "arguments": real_episode.steps[0].arguments}
    assert all(a.endswith("<|end_call|>\n") for a in actions)


def test_warning_and_error_roles(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", [small_episode()])
    (ep,) = load_episodes([path])
    rendered = render_episode(ep)
    by_role = {r: "".join(t for t, rr in rendered.segments if rr == r) for r in range(5)}
    assert "422: id must be an integer" in by_role[roles.ENV_OUTPUT]
    assert by_role[roles.WARNING] == "tool result truncated\n"
    assert "tool result truncated" not in by_role[roles.ENV_OUTPUT]


@settings(max_examples=60, deadline=None)
@given(st.text(min_size=0, max_size=200))
def test_vocab_round_trip_for_any_text(text):
    enc_vocab = _small_vocab()
    assert enc_vocab.decode(enc_vocab.encode_text(text)) == text


_VOCAB = []


def _small_vocab():
    if not _VOCAB:
        (ep,) = load_episodes([REAL])
        tok = tokenize_rendered(render_episode(ep))
        _VOCAB.append(build_vocab([tok.ids[:200]], 400))  # Most tokens fall back to bytes.
    return _VOCAB[0]


def test_vocab_size_cap_and_layout(real_episode):
    tok = tokenize_rendered(render_episode(real_episode))
    vocab = build_vocab([tok.ids], 300)
    assert vocab.size == 300
    assert vocab.cl100k_ids[0] == -1
    # Held-out text with tokens the vocabulary never saw still round-trips.
    held_out = "Ünïcødé tokens the vocabulary never saw: 量子コンピュータ 🚀"
    assert vocab.decode(vocab.encode_text(held_out)) == held_out


def test_window_spans_cut_at_steps_and_inside_oversized_steps():
    # prefix 10 tokens, steps at 10, 20, 45; 60 tokens; max_len 30 -> budget 20. The oversized
    # second step is split inside; its tail shares a window with the next step, which fits.
    spans = window_spans(60, 10, np.array([10, 20, 45]), 30)
    assert spans == [(10, 20), (20, 40), (40, 60)]
    # Steps that fit together share a window; one that does not fit starts a new one.
    assert window_spans(70, 10, np.array([10, 15, 25, 40]), 30) == [
        (10, 25),
        (25, 40),
        (40, 60),
        (60, 70),
    ]
    assert window_spans(25, 10, np.array([10, 20]), 30) == [(10, 25)]


@pytest.mark.parametrize("max_len", [7 * 53, 13 * 31, 2048])
def test_pack_windows_keep_every_token(real_episode, max_len):
    tokenized = tokenize_episodes([real_episode], canonical_json=False)
    vocab = build_vocab([t.ids for t in tokenized], 8192)
    data = pack([real_episode], tokenized, vocab, max_len, "window")
    n = data.num_rows
    chex.assert_shape([data.tokens, data.roles], (n, max_len))
    chex.assert_type([data.tokens, data.roles], [np.int32, np.int8])
    chex.assert_shape([data.reward, data.group, data.episode, data.advantage], (n,))
    stats = data.stats
    assert sum(stats.dropped_by_role) == 0
    total = to_compact(tokenized[0], vocab).ids.size
    assert sum(stats.kept_by_role) == total
    prefix = to_compact(tokenized[0], vocab).prefix_len
    for row in range(n):  # Every window restarts with the CONTEXT prefix.
        np.testing.assert_array_equal(data.tokens[row, :prefix], data.tokens[0, :prefix])
        assert (data.roles[row, :prefix] == roles.CONTEXT).all()
    non_prefix = (data.roles[:, prefix:] != roles.PAD).sum()
    assert non_prefix == total - prefix
    assert stats.repeated_prefix_tokens == prefix * (n - 1)


def test_truncate_reports_dropped_tokens(real_episode):
    tokenized = tokenize_episodes([real_episode], canonical_json=False)
    vocab = build_vocab([t.ids for t in tokenized], 8192)
    data = pack([real_episode], tokenized, vocab, 512, "truncate")
    assert data.num_rows == 1
    total = to_compact(tokenized[0], vocab).ids.size
    assert sum(data.stats.kept_by_role) == 512
    assert sum(data.stats.dropped_by_role) == total - 512
    assert data.stats.dropped_by_role[roles.ENV_OUTPUT] > 0


def test_max_len_too_small_for_context_names_the_episode(tmp_path):
    with pytest.raises(EpisodeError, match=r"awm_e_commerce_33_task0\.json.*context prefix"):
        load_packed(DataConfig(paths=(REAL,), max_len=64))


def test_groups_rewards_and_advantages(tmp_path):
    records = [
        small_episode(reward=1.0),
        small_episode(reward=0.0),
        small_episode(task_idx=1, reward=0.0),
        small_episode(scenario="shop_2", reward=0.5),
        small_episode(scenario="shop_2", reward=0.5, capture={"k": 1}),  # Not a duplicate.
    ]
    path = write_jsonl(tmp_path / "e.jsonl.gz", records, gz=True)
    data, _ = load_packed(DataConfig(paths=(path,), max_len=128))
    assert data.num_rows == 5
    np.testing.assert_array_equal(data.reward, [1.0, 0.0, 0.0, 0.5, 0.5])
    assert data.group[0] == data.group[1] != data.group[2]
    assert data.group[3] == data.group[4]
    np.testing.assert_allclose(data.advantage, [1.0, -1.0, 0.0, 0.0, 0.0], atol=1e-5)


def test_loader_accepts_json_jsonl_gz_and_globs(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [small_episode(), small_episode(task_idx=1)])
    write_jsonl(tmp_path / "b.jsonl.gz", [small_episode(task_idx=2)], gz=True)
    (tmp_path / "c.json").write_text(json.dumps(small_episode(task_idx=3, extra_key={"x": 1})))
    eps = load_episodes([str(tmp_path / "*")])
    assert [e.task_idx for e in eps] == [0, 1, 2, 3]
    assert eps[1].source.endswith("a.jsonl:2")
    assert eps[3].extras == {"extra_key": {"x": 1}}


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda e: e.pop("task"), "task"),
        (lambda e: e.update(reward="high"), "reward"),
        (lambda e: e.update(reward=float("nan")), "reward"),
        (lambda e: e.update(steps=[]), "steps"),
        (lambda e: e["steps"][1]["action"].pop("tool_name"), "steps[1].action.tool_name"),
        (lambda e: e["steps"][0]["observation"].update(tool_result=5), "tool_result"),
        (lambda e: e.update(task_idx="0"), "task_idx"),
    ],
)
def test_bad_episodes_name_file_line_and_field(tmp_path, mutate, field):
    bad = small_episode()
    mutate(bad)
    path = write_jsonl(tmp_path / "eps.jsonl", [small_episode(), bad])
    with pytest.raises(EpisodeError) as err:
        load_episodes([path])
    assert "eps.jsonl:2: field '" in str(err.value)
    assert field in err.value.field


def test_invalid_json_and_empty_glob(tmp_path):
    path = tmp_path / "eps.jsonl"
    path.write_text(json.dumps(small_episode()) + "\n{not json\n")
    with pytest.raises(EpisodeError, match=r"eps\.jsonl:2: field '<json>'"):
        load_episodes([str(path)])
    with pytest.raises(EpisodeError, match="no episode file matches"):
        load_episodes([str(tmp_path / "nothing*.jsonl")])
