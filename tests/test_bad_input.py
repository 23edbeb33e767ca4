"""Bad episode input: each case fails before any training, naming the file, line and field.

Also: --skip_invalid reporting, duplicate detection, saved packed arrays, and a property test
that any mutated episode either packs into well-formed arrays or raises EpisodeError.
"""

import copy
import gzip
import json
import logging
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from echo_jax.config import DataConfig
from echo_jax.data import roles
from echo_jax.data.dataset import load_packed
from echo_jax.data.episode_files import SkipReport, load_episodes
from echo_jax.data.episodes import EpisodeError
from echo_jax.data.packed_io import PackedFileError, load_packed_file, save_packed
from echo_jax.data.packing import pack, tokenize_episodes
from echo_jax.data.vocab import build_vocab
from tests.test_data import small_episode, write_jsonl


def _line(record) -> bytes:
    return (json.dumps(record) + "\n").encode()


def _mutated(change):
    ep = small_episode()
    change(ep)
    return ep


GOOD = _line(small_episode())

# (id, bytes of line 2 of eps.jsonl, expected field, expected words in the problem)
BAD_LINES = [
    ("invalid_json", b'{"scenario": "shop_1", "task":\n', "<json>", "invalid JSON"),
    ("not_utf8", b'{"scenario": "shop_\xff"}\n', "<bytes>", "not UTF-8"),
    ("not_an_object", b"[1, 2]\n", "<episode>", "expected a JSON object"),
    ("missing_key", _line(_mutated(lambda e: e.pop("scenario"))), "scenario", "missing"),
    ("mistyped_key", _line(_mutated(lambda e: e.update(tools="find"))), "tools", "expected list"),
    ("empty_steps", _line(_mutated(lambda e: e.update(steps=[]))), "steps", "empty"),
    (
        "action_without_tool_name",
        _line(_mutated(lambda e: e["steps"][0]["action"].pop("tool_name"))),
        "steps[0].action.tool_name",
        "missing",
    ),
    ("nan_reward", _line(_mutated(lambda e: e.update(reward=float("nan")))), "reward", "finite"),
    ("inf_reward", _line(_mutated(lambda e: e.update(reward=float("inf")))), "reward", "finite"),
    ("string_reward", _line(_mutated(lambda e: e.update(reward="1.0"))), "reward", "number"),
    ("bool_reward", _line(_mutated(lambda e: e.update(reward=True))), "reward", "number"),
    ("huge_reward", _line(_mutated(lambda e: e.update(reward=1e30))), "reward", "out of range"),
    (
        "lone_surrogate",
        _line(_mutated(lambda e: e.update(task="a\ud800b"))),
        "task",
        "lone surrogate",
    ),
    (
        "deep_nesting",
        _line(
            _mutated(lambda e: e["steps"][0]["action"].update(arguments={"q": [[[[[1]]]]] * 1}))
        ).replace(b"[[[[[1]]]]]", b"[" * 70 + b"1" + b"]" * 70),
        "steps[0].action.arguments.q",
        "nested deeper",
    ),
    ("negative_task_idx", _line(_mutated(lambda e: e.update(task_idx=-1))), "task_idx", ">= 0"),
]


@pytest.mark.parametrize(
    "raw, field, problem", [c[1:] for c in BAD_LINES], ids=[c[0] for c in BAD_LINES]
)
def test_bad_line_names_file_line_and_field(tmp_path, raw, field, problem):
    path = tmp_path / "eps.jsonl"
    path.write_bytes(GOOD + raw)
    with pytest.raises(EpisodeError) as err:
        load_episodes([str(path)])
    assert err.value.source == f"{path}:2"
    assert err.value.field.startswith(field)  # Deep nesting names the innermost position.
    assert problem in err.value.problem
    assert str(err.value).startswith(f"{path}:2: field '{field}")


def test_truncated_gzip_names_file_and_last_good_line(tmp_path):
    path = write_jsonl(
        tmp_path / "eps.jsonl.gz",
        [small_episode(task_idx=i, task=os.urandom(4000).hex()) for i in range(100)],
        gz=True,
    )
    data = (tmp_path / "eps.jsonl.gz").read_bytes()
    (tmp_path / "eps.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(
        EpisodeError,
        match=r"eps\.jsonl\.gz: field '<file>': cannot be read: .*"
        r"\(after line \d+\)",
    ):
        load_episodes([path])


def test_tens_of_megabytes_observation_is_refused(tmp_path):
    huge = _mutated(lambda e: e["steps"][0]["observation"].update(tool_result="x" * 30_000_000))
    path = tmp_path / "eps.jsonl"
    path.write_bytes(GOOD + _line(huge))
    with pytest.raises(EpisodeError) as err:
        load_episodes([str(path)])
    assert err.value.source == f"{path}:2"
    assert err.value.field == "steps[0].observation.tool_result"
    assert "30,000,000 characters, over the limit of 1,048,576 (max_field_chars)" in str(err.value)
    # The cap is configurable, and a record far over it is refused before it is parsed.
    assert len(load_episodes([str(path)], max_field_chars=40_000_000)) == 2
    with pytest.raises(EpisodeError, match=r"eps\.jsonl:2: field '<record>': too large"):
        load_episodes([str(path)], max_field_chars=100_000)


def test_duplicate_episode_names_both_sources(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [small_episode(), small_episode(task_idx=1)])
    # Same content with other key order and spacing is still the same episode.
    reordered = dict(reversed(list(small_episode(task_idx=1).items())))
    (tmp_path / "b.json").write_text(json.dumps(reordered, indent=3))
    with pytest.raises(EpisodeError) as err:
        load_episodes([a, str(tmp_path / "b.json")])
    assert str(err.value) == (
        f"{tmp_path / 'b.json'}: field '<episode>': duplicate (same content as {a}:2)"
    )
    # Across --data paths too (each path is loaded on its own).
    with pytest.raises(EpisodeError, match="duplicate"):
        load_packed(DataConfig(paths=(a, str(tmp_path / "b.json")), max_len=128))


def test_skip_invalid_skips_and_reports_by_reason(tmp_path, caplog):
    lines = [
        GOOD,
        b"{not json\n",
        _line(_mutated(lambda e: e.update(reward=float("nan")))),
        _line(small_episode(task_idx=1)),
        _line(_mutated(lambda e: e.update(reward=float("-inf")))),
        GOOD,  # duplicate of line 1
        _line(_mutated(lambda e: e["steps"][1]["action"].pop("tool_name"))),
    ]
    path = tmp_path / "eps.jsonl"
    path.write_bytes(b"".join(lines))
    report = SkipReport()
    eps = load_episodes([str(path)], skip_invalid=True, report=report)
    assert [e.source for e in eps] == [f"{path}:1", f"{path}:4"]
    assert {reason: len(errs) for reason, errs in report.by_reason().items()} == {
        "field 'reward': not finite": 2,
        "field '<json>': invalid JSON": 1,
        "field '<episode>': duplicate": 1,
        "field 'steps[].action.tool_name': missing or not a non-empty string": 1,
    }
    assert report.summary().startswith("loaded 2 episodes, skipped 5 invalid: 2 x field 'reward'")
    # Through DataConfig (what --skip_invalid sets), the report is logged as a warning.
    with caplog.at_level(logging.WARNING):
        data, _ = load_packed(DataConfig(paths=(str(path),), max_len=128, skip_invalid=True))
    assert data.stats.episodes == 2
    assert "skipped 5 invalid" in caplog.text and f"(first: {path}:3)" in caplog.text
    with pytest.raises(EpisodeError, match=r"eps\.jsonl:2: field '<json>'"):
        load_packed(DataConfig(paths=(str(path),), max_len=128))


def test_skip_invalid_still_refuses_missing_files_and_empty_globs(tmp_path):
    with pytest.raises(EpisodeError, match="does not exist"):
        load_episodes([str(tmp_path / "nope.jsonl")], skip_invalid=True)
    with pytest.raises(EpisodeError, match="no episode file matches"):
        load_episodes([str(tmp_path / "*.jsonl")], skip_invalid=True)


# --- saved packed arrays --------------------------------------------------------------------


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    path = write_jsonl(
        tmp_path_factory.mktemp("p") / "e.jsonl", [small_episode(task_idx=i) for i in range(3)]
    )
    data, vocab = load_packed(DataConfig(paths=(path,), max_len=128))
    return data, vocab


def test_packed_arrays_round_trip(packed, tmp_path):
    data, vocab = packed
    save_packed(tmp_path / "p.npz", data)
    back = load_packed_file(tmp_path / "p.npz", vocab_size=vocab.size)
    for name in ("tokens", "roles", "reward", "group", "episode", "advantage"):
        np.testing.assert_array_equal(getattr(back, name), getattr(data, name))
        assert getattr(back, name).dtype == getattr(data, name).dtype
    assert back.stats == data.stats
    assert os.listdir(tmp_path) == ["p.npz"]  # No temp file left behind.


def _resave(path, **changes):
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays.update(changes)
    np.savez(path, **arrays)


def test_role_outside_the_table_is_refused_on_load(packed, tmp_path):
    data, vocab = packed
    path = tmp_path / "p.npz"
    save_packed(path, data)
    bad = data.roles.copy()
    bad[1, 5] = 9
    _resave(path, roles=bad)
    with pytest.raises(PackedFileError) as err:
        load_packed_file(path)
    assert str(err.value) == (
        f"{path}: array 'roles': role value 9 at index (1, 5) is outside the role table 0..4 "
        "(pad, context, action, env_output, warning)"
    )


@pytest.mark.parametrize(
    "change, array, problem",
    [
        (lambda d: {"tokens": d.tokens.astype(np.int64)}, "tokens", "dtype int64"),
        (lambda d: {"tokens": d.tokens + 10**6}, "tokens", "outside the vocabulary"),
        (lambda d: {"reward": np.full_like(d.reward, np.nan)}, "reward", "non-finite"),
        (lambda d: {"group": d.group[:-1]}, "group", "shape"),
        (lambda d: {"meta": np.array("{}")}, "meta", "format version"),
    ],
)
def test_inconsistent_packed_file_is_refused(packed, tmp_path, change, array, problem):
    data, vocab = packed
    path = tmp_path / "p.npz"
    save_packed(path, data)
    _resave(path, **change(data))
    with pytest.raises(PackedFileError, match=rf"p\.npz: array '{array}': .*{problem}"):
        load_packed_file(path, vocab_size=vocab.size)


def test_corrupt_packed_file_is_refused(packed, tmp_path):
    path = tmp_path / "p.npz"
    save_packed(path, packed[0])
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(PackedFileError, match=r"p\.npz: array '<file>': not a readable"):
        load_packed_file(path)


# --- property: loader + packer accept well-formed arrays or raise EpisodeError ---------------

_json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
_json = st.recursive(
    _json_leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)
_KEYS = ["scenario", "task", "task_idx", "tools", "steps", "reward"]
_STEP_PATHS = [
    ("action",),
    ("action", "tool_name"),
    ("action", "arguments"),
    ("observation",),
    ("observation", "tool_result"),
    ("observation", "error"),
    ("observation", "warning"),
    ("observation", "verify_result"),
]


@st.composite
def mutated_episode(draw):
    ep = copy.deepcopy(small_episode())
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["drop", "retype", "unicode", "huge", "nest", "step"]))
        if kind == "drop":
            ep.pop(draw(st.sampled_from(_KEYS)), None)
        elif kind == "retype":
            ep[draw(st.sampled_from(_KEYS))] = draw(_json)
        elif kind == "unicode":
            any_char = st.characters(exclude_categories=())  # Lone surrogates included.
            ep[draw(st.sampled_from(["task", "scenario"]))] = draw(st.text(any_char, max_size=200))
        elif kind == "huge":
            ep["task"] = draw(st.sampled_from(["é", "x", "🚀", "\n", " "])) * draw(
                st.integers(10_000, 300_000)
            )
        elif kind == "nest":
            depth = draw(st.integers(1, 80))
            ep["extra"] = json.loads("[" * depth + "]" * depth)
        elif kind == "step" and isinstance(ep.get("steps"), list) and ep["steps"]:
            step = ep["steps"][draw(st.integers(0, len(ep["steps"]) - 1))]
            path = draw(st.sampled_from(_STEP_PATHS))
            target = step
            for key in path[:-1]:
                target = target.get(key) if isinstance(target, dict) else None
            if isinstance(target, dict):
                if draw(st.booleans()):
                    target.pop(path[-1], None)
                else:
                    target[path[-1]] = draw(_json)
    return ep


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(records=st.lists(mutated_episode(), min_size=1, max_size=3), gz=st.booleans())
def test_any_mutated_episode_packs_or_raises_episode_error(tmp_path, records, gz):
    path = tmp_path / ("eps.jsonl.gz" if gz else "eps.jsonl")
    text = "".join(json.dumps(r, ensure_ascii=bool(len(r) % 2)) + "\n" for r in records)
    data = text.encode("utf-8", "surrogatepass")
    path.write_bytes(gzip.compress(data) if gz else data)
    max_len = 256
    try:
        episodes = load_episodes([str(path)])
        tokenized = tokenize_episodes(episodes, canonical_json=False)
        vocab = build_vocab([t.ids for t in tokenized], 1024)
        packed = pack(episodes, tokenized, vocab, max_len, "window")
    except EpisodeError as e:
        assert str(path) in e.source and e.field
        return
    n = packed.num_rows
    assert n >= len(episodes) >= 1
    assert packed.tokens.shape == packed.roles.shape == (n, max_len)
    assert packed.tokens.dtype == np.int32 and packed.roles.dtype == np.int8
    assert ((packed.roles >= 0) & (packed.roles < roles.NUM_ROLES)).all()
    assert ((packed.tokens >= 0) & (packed.tokens < vocab.size)).all()
    for arr in (packed.reward, packed.advantage):
        assert arr.shape == (n,) and np.isfinite(arr).all()
