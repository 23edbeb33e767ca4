import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from echo_jax.config import Config, DataConfig, EvalConfig, TrainConfig
from echo_jax.data import roles
from echo_jax.data.dataset import load_packed
from echo_jax.train.evaluation import (
    EVAL_FILE,
    EvalSet,
    Evaluator,
    aggregate,
    append_line,
    chunked_role_sums,
    evaluate_set,
    load_eval_sets,
    role_sums,
)
from echo_jax.util.jsonl import read_jsonl
from tests.corpus_fixture import make_tiny_corpus, write_real_like

A, E, C = roles.ACTION, roles.ENV_OUTPUT, roles.CONTEXT


def test_uniform_logits_give_log_v_and_zero_accuracy():
    b, t, v = 2, 6, 11
    tokens = np.array([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 1, 0]], np.int32)
    role_arr = np.array([[C, A, A, E, E, E], [C, E, A, A, E, 0]], np.int32)
    sums = role_sums(jnp.zeros((b, t, v)), tokens, role_arr)
    # Targets are tokens[:, 1:]; their roles decide the term. Row 0: 2 action, 3 env.
    np.testing.assert_allclose(sums["env_count"], [3, 2])
    np.testing.assert_allclose(sums["action_count"], [2, 2])
    np.testing.assert_allclose(sums["env_ce_sum"], np.array([3, 2]) * math.log(v), rtol=1e-6)
    np.testing.assert_allclose(sums["action_ce_sum"], np.array([2, 2]) * math.log(v), rtol=1e-6)
    # argmax of equal logits is id 0 (PAD), never a label here.
    np.testing.assert_array_equal(sums["env_correct"], [0, 0])


@pytest.mark.parametrize("k", [0, 3, 7])
def test_accuracy_is_exactly_k_of_n(k):
    n, v = 7, 9
    rng = np.random.default_rng(k)
    tokens = rng.integers(1, v, (1, n + 1)).astype(np.int32)
    role_arr = np.full((1, n + 1), E, np.int32)
    labels = tokens[0, 1:]
    logits = np.zeros((1, n + 1, v), np.float32)
    wrong = (labels % (v - 1)) + 1  # A different non-PAD id.
    right = np.arange(n) < k
    logits[0, np.arange(n), np.where(right, labels, wrong)] = 5.0
    sums = role_sums(jnp.asarray(logits), tokens, role_arr)
    assert float(sums["env_correct"][0]) == k
    assert float(sums["env_count"][0]) == n
    # CE: -log softmax at the label, with one logit at 5 and the rest at 0.
    log_z = math.log(math.exp(5.0) + (v - 1))
    want = k * (log_z - 5.0) + (n - k) * log_z
    np.testing.assert_allclose(float(sums["env_ce_sum"][0]), want, rtol=1e-5)


def test_action_metrics_only_over_successful_rows():
    sums = {
        "env_ce_sum": np.array([2.0, 4.0, 6.0]),
        "env_correct": np.array([1.0, 0.0, 2.0]),
        "env_count": np.array([2.0, 2.0, 4.0]),
        "action_ce_sum": np.array([1.0, 100.0, 3.0]),
        "action_correct": np.array([1.0, 0.0, 1.0]),
        "action_count": np.array([1.0, 10.0, 3.0]),
    }
    got = aggregate(sums, np.array([True, False, True]))
    assert got["env_ce"] == pytest.approx(12 / 8) and got["env_acc"] == pytest.approx(3 / 8)
    assert got["action_ce"] == pytest.approx(4 / 4) and got["action_acc"] == pytest.approx(2 / 4)
    assert got["action_tokens"] == 4 and got["success_rows"] == 2
    none = aggregate(sums, np.zeros(3, bool))
    assert math.isnan(none["action_ce"]) and math.isnan(none["action_acc"])
    assert none["env_ce"] == got["env_ce"]


def test_padding_and_batch_size_do_not_change_the_means():
    rng = np.random.default_rng(0)
    n, t, v = 5, 8, 7
    es = EvalSet(
        name="x",
        tokens=rng.integers(1, v, (n, t)).astype(np.int32),
        roles=rng.choice([C, A, E], (n, t)).astype(np.int32),
        success=np.array([True, False, True, True, False]),
        total_rows=n,
        episodes=n,
    )
    table = rng.normal(size=(v, v)).astype(np.float32)

    @jax.jit
    def step(params, tokens, role_arr):  # A bigram "model": logits from the current token.
        return role_sums(params[tokens], tokens, role_arr)

    a = evaluate_set(step, table, es, batch_size=2)  # 3 calls, the last one padded
    b = evaluate_set(step, table, es, batch_size=5)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-6, err_msg=key)
    assert a["rows"] == n and a["success_rows"] == 3


def test_eval_sets_from_a_corpus_and_the_real_file(tmp_path):
    data = make_tiny_corpus(tmp_path / "corpus")
    real = write_real_like(tmp_path / "r.json")
    cfg = Config(
        data=DataConfig(paths=(data,), max_len=128, cache_dir=""),
        eval=EvalConfig(max_rows=3, real_path=real),
    )
    train, vocab = load_packed(cfg.data)
    logs = []
    sets = load_eval_sets(cfg, vocab, train, log=logs.append)
    assert list(sets) == ["train", "heldout_tasks", "heldout_scenarios", "real"]
    # 3 scenarios x 3 tasks x 2 episodes: 1 scenario held out, 1 task of each other one.
    assert [sets[n].total_rows for n in sets] == [8, 4, 6, 1]
    assert all(s.tokens.shape == (min(3, s.total_rows), 128) for s in sets.values())
    assert not sets["real"].success.any() and sets["heldout_scenarios"].success.any()
    # The subsample is fixed: the same rows every time.
    again = load_eval_sets(cfg, vocab, train, log=logs.append)
    np.testing.assert_array_equal(again["train"].tokens, sets["train"].tokens)

    # Plain files have no held-out splits; a missing real file is skipped, with a note each.
    plain = dataclasses.replace(
        cfg,
        data=DataConfig(paths=(real,), max_len=128, cache_dir=""),
        eval=EvalConfig(real_path=str(tmp_path / "missing.json")),
    )
    assert list(load_eval_sets(plain, vocab, None, log=logs.append)) == ["train"]
    assert sum("skipping" in m for m in logs) == 3


def test_evaluator_schedule_and_truncate(tmp_path):
    cfg = Config(train=TrainConfig(steps=10), eval=EvalConfig(every=4))
    ev = Evaluator(cfg, {}, str(tmp_path / EVAL_FILE), log=lambda _: None)
    assert [s for s in range(1, 11) if ev.due(s)] == [4, 8, 10]
    only_end = Evaluator(dataclasses.replace(cfg, eval=EvalConfig()), {}, None)
    assert [s for s in range(1, 11) if only_end.due(s)] == [10]
    for step in (4, 8, 10):
        append_line(ev.path, {"step": step, "x/env_ce": float("nan")})
    ev.truncate(after_step=8)
    lines = read_jsonl(ev.path)
    assert [m["step"] for m in lines] == [4, 8] and lines[0]["x/env_ce"] is None


def test_no_splits_means_no_evaluator():
    cfg = Config(eval=dataclasses.replace(EvalConfig(), splits=()))
    assert Evaluator.for_run(cfg, vocab=None, train_data=None, workdir="/nonexistent") is None


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_sums_equal_plain_sums(chunk):
    rng = np.random.default_rng(chunk)
    b, t, d, v = 2, 7, 4, 11
    h = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    tokens = rng.integers(1, v, (b, t)).astype(np.int32)
    role_arr = rng.choice([C, A, E], (b, t)).astype(np.int32)
    want = role_sums(jnp.einsum("btd,dv->btv", h, w), tokens, role_arr)
    got = chunked_role_sums(h, w, tokens, role_arr, chunk)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5, err_msg=key)


def test_config_round_trips_with_eval_and_reads_older_runs():
    cfg = Config(eval=EvalConfig(every=5, splits=("real",), max_rows=7))
    import json

    assert Config.from_dict(json.loads(cfg.to_json())) == cfg
    old = json.loads(Config().to_json())
    del old["eval"]
    assert Config.from_dict(old).eval == EvalConfig()
