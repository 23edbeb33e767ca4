import dataclasses
import json
import os

import chex
import jax
import numpy as np
import optax
import pytest
from flax import nnx

from echo_jax.config import (
    Config,
    ConfigError,
    DataConfig,
    LossConfig,
    ModelConfig,
    TrainConfig,
    validate,
)
from echo_jax.data import roles
from echo_jax.data.dataset import load_packed
from echo_jax.data.vocab import Vocab
from echo_jax.objective.loss import echo_loss
from echo_jax.train.run_dir import RunDir, RunDirError
from echo_jax.train.trainer import (
    batch_indices,
    init_model,
    init_state,
    make_batch,
    make_optimizer,
    make_train_step,
    make_train_steps,
    run_experiment,
)
from tests.cli import run_module
from tests.test_data import small_episode, write_jsonl

ROOT = os.path.join(os.path.dirname(__file__), "..")
GOLDEN = os.path.join(os.path.dirname(__file__), "golden_one_step.json")
SHIPPED_EPISODE = "--data=data/awm_e_commerce_33_task0.json"
TINY_MODEL = ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32)


@pytest.fixture(scope="module")
def episodes_path(tmp_path_factory):
    records = [small_episode(task_idx=i % 3, reward=float(i % 2)) for i in range(6)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "eps.jsonl", records)


def tiny_config(paths, **train) -> Config:
    return Config(
        model=TINY_MODEL,
        loss=LossConfig(objective="echo", lam=0.1),
        data=DataConfig(paths=(paths,), max_len=128),
        train=TrainConfig(
            **{"steps": 6, "batch_size": 3, "log_every": 1, "checkpoint_every": 3, **train}
        ),
    )


def assert_same_metrics(dir_a, dir_b, steps, rtol):
    """Run b logged exactly `steps`, each with run a's values (the timing columns aside)."""
    timing = ("steps_per_s", "tokens_per_s")
    lines_a, lines_b = (
        [{k: v for k, v in m.items() if k not in timing} for m in RunDir(d).read_metrics()]
        for d in (dir_a, dir_b)
    )
    assert [m["step"] for m in lines_b] == list(steps)
    for la, lb in zip(lines_a, lines_b, strict=True):
        for key in la:
            np.testing.assert_allclose(lb[key], la[key], rtol=rtol, err_msg=key)


def one_step(cfg: Config):
    data, vocab = load_packed(cfg.data)
    tx = make_optimizer(cfg.train)
    graphdef, params = init_model(cfg, vocab.size, cfg.train.seed)
    state = init_state(params, tx)
    batch = make_batch(data, batch_indices(0, data.num_rows, cfg.train.batch_size, 0))
    return graphdef, tx, state, batch


def test_golden_one_step(episodes_path):
    """Loss and parameter norm after one step, against numbers recorded when the step was
    written. A change here means training changed: re-record only on purpose."""
    cfg = tiny_config(episodes_path)
    graphdef, tx, state, batch = one_step(cfg)
    step = make_train_step(graphdef, tx, cfg.loss)
    state, metrics = step(state, batch)
    got = {
        "loss": float(metrics["loss"]),
        "env_ce": float(metrics["env_ce"]),
        "pg_loss": float(metrics["pg_loss"]),
        "param_norm": float(optax.tree.norm(state.params)),
    }
    if os.environ.get("ECHO_REGENERATE_GOLDEN"):
        with open(GOLDEN, "w") as f:
            json.dump(got, f, indent=2)
    with open(GOLDEN) as f:
        want = json.load(f)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=2e-4, err_msg=key)


def test_train_step_equals_a_plain_optax_update(episodes_path):
    cfg = tiny_config(episodes_path)
    graphdef, tx, state, batch = one_step(cfg)

    def loss_fn(params):
        return echo_loss(nnx.merge(graphdef, params)(batch.tokens_BT), batch, cfg.loss)[0]

    grads = jax.jit(jax.grad(loss_fn))(state.params)
    updates, _ = tx.update(grads, state.opt_state, state.params)
    want = optax.apply_updates(state.params, updates)
    want = jax.tree.map(np.asarray, want)  # The step donates `state`; copy first.
    new_state, metrics = make_train_step(graphdef, tx, cfg.loss)(state, batch)
    chex.assert_trees_all_close(new_state.params, want, rtol=1e-5, atol=1e-6)
    assert int(new_state.step) == 1
    counts = sum(int(metrics[f"targets_{n}"]) for n in roles.NAMES)
    assert counts == batch.tokens_BT.shape[0] * (batch.tokens_BT.shape[1] - 1)


def test_non_finite_loss_leaves_state_untouched(episodes_path):
    cfg = tiny_config(episodes_path)
    graphdef, tx, state, batch = one_step(cfg)
    before = jax.tree.map(np.asarray, state.params)
    batch = batch._replace(advantages_B=np.full_like(batch.advantages_B, np.nan))
    new_state, metrics = make_train_step(graphdef, tx, cfg.loss)(state, batch)
    assert bool(metrics["nonfinite"])
    assert int(new_state.step) == 0
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, new_state.params), before)


def _stacked_batches(cfg: Config, k: int):
    """Batches of steps 0 .. k-1 as the loop draws them: a list, and stacked on a K axis."""
    data, _ = load_packed(cfg.data)
    b = cfg.train.batch_size
    rows = np.stack([batch_indices(s, data.num_rows, b, cfg.train.seed) for s in range(k)])
    return [make_batch(data, r) for r in rows], make_batch(data, rows)


def test_steps_in_one_call_equal_single_steps(episodes_path):
    """make_train_steps is make_train_step K times: the same state and per-step metrics, the
    inactive slots skipped (state untouched, metrics zero)."""
    cfg = tiny_config(episodes_path)
    graphdef, tx, state, _ = one_step(cfg)
    singles, stacked = _stacked_batches(cfg, 5)
    start = jax.tree.map(np.asarray, state)  # Both forms donate their state.
    step, want = make_train_step(graphdef, tx, cfg.loss), []
    for batch in singles[:3]:
        state, metrics = step(state, batch)
        want.append(jax.device_get(metrics))
    active = np.array([True, True, True, False, False])
    got_state, got = make_train_steps(graphdef, tx, cfg.loss)(start, stacked, active)
    chex.assert_shape(got["loss"], (5,))
    assert int(got_state.step) == 3
    chex.assert_trees_all_close(got_state.params, state.params, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(got_state.opt_state, state.opt_state, rtol=1e-6, atol=1e-7)
    for i, metrics in enumerate(want):
        for key, value in metrics.items():
            np.testing.assert_allclose(got[key][i], value, rtol=1e-6, err_msg=key)
    assert all(not np.any(np.asarray(v)[3:]) for v in got.values())


def test_a_call_stops_at_its_first_non_finite_step(episodes_path):
    """Step 2 of 4 diverges: the call keeps step 1's state and skips steps 3 and 4, as the loop
    would have stopped there with single steps."""
    cfg = tiny_config(episodes_path)
    graphdef, tx, state, _ = one_step(cfg)
    singles, stacked = _stacked_batches(cfg, 4)
    advantages_KB = stacked.advantages_B.copy()
    advantages_KB[1] = np.nan
    stacked = stacked._replace(advantages_B=advantages_KB)
    start = jax.tree.map(np.asarray, state)
    want, _ = make_train_step(graphdef, tx, cfg.loss)(state, singles[0])
    got_state, got = make_train_steps(graphdef, tx, cfg.loss)(start, stacked, np.ones(4, bool))
    np.testing.assert_array_equal(got["nonfinite"], [False, True, False, False])
    assert np.isfinite(got["loss"][0]) and np.isnan(got["loss"][1])
    np.testing.assert_array_equal(got["loss"][2:], 0.0)  # Skipped, not run.
    assert int(got_state.step) == 1
    chex.assert_trees_all_close(got_state.params, want.params, rtol=1e-6, atol=1e-7)


def test_steps_per_call_does_not_change_training(episodes_path, tmp_path):
    """Calls of 1, 2 or 4 steps (cut at checkpoints) give the same checkpoints and metrics."""
    runs = {}
    for k in (1, 2, 4):
        cfg = tiny_config(episodes_path, steps_per_call=k)
        runs[k] = run_experiment(cfg, str(tmp_path / f"k{k}"), log=lambda _: None)
    template = init_state(
        init_model(cfg, Vocab.load(tmp_path / "k1" / "vocab.json").size, 0)[1],
        make_optimizer(cfg.train),
    )
    ref_state, ref_meta = RunDir(tmp_path / "k1").restore(template, 6)
    for k in (2, 4):
        run = RunDir(tmp_path / f"k{k}")
        assert sorted(run.manager.all_steps()) == [3, 6]
        state, meta = run.restore(template, 6)
        assert meta == ref_meta
        chex.assert_trees_all_close(state.params, ref_state.params, rtol=1e-6, atol=1e-7)
        assert_same_metrics(tmp_path / "k1", run.path, range(1, 7), rtol=1e-6)
        assert runs[k]["final"]["loss"] == pytest.approx(runs[1]["final"]["loss"], rel=1e-6)


def test_steps_per_call_below_one_is_refused():
    with pytest.raises(ConfigError, match="steps_per_call must be >= 1, got 0"):
        validate(Config(train=TrainConfig(steps_per_call=0)))


def test_batch_indices_are_deterministic_permutations():
    n, b = 7, 3
    seen = np.concatenate([batch_indices(s, n, b, seed=5) for s in range(7)])  # 3 epochs
    for epoch in range(3):
        assert sorted(seen[epoch * n : (epoch + 1) * n]) == list(range(n))
    np.testing.assert_array_equal(batch_indices(4, n, b, 5), batch_indices(4, n, b, 5))
    assert not np.array_equal(batch_indices(0, n, b, 5), batch_indices(0, n, b, 6))


def test_end_to_end_resume_matches_uninterrupted_run(episodes_path, tmp_path):
    cfg = tiny_config(episodes_path)
    full = run_experiment(cfg, str(tmp_path / "full"), log=lambda _: None)
    assert full["final"]["step"] == 6 and np.isfinite(full["final"]["loss"])
    full_run = RunDir(tmp_path / "full")
    assert full_run.latest_checkpoint_step() == 6

    # Interrupt a second run after step 3: drop its last checkpoint and metrics beyond it.
    cut = tmp_path / "cut"
    run_experiment(cfg, str(cut), log=lambda _: None)
    cut_run = RunDir(cut)
    cut_run.manager.delete(6)
    cut_run.truncate_metrics(after_step=3)
    with pytest.raises(RunDirError, match="--resume"):
        run_experiment(cfg, str(cut), log=lambda _: None)
    resumed = run_experiment(cfg, str(cut), resume=True, log=lambda _: None)
    assert resumed["resumed_from"] == 3

    template = init_state(
        init_model(cfg, Vocab.load(cut / "vocab.json").size, 0)[1],
        make_optimizer(cfg.train),
    )
    a, meta_a = full_run.restore(template, 6)
    b, meta_b = RunDir(cut).restore(template, 6)
    chex.assert_trees_all_close(a.params, b.params, rtol=1e-6, atol=1e-7)
    assert meta_a == meta_b == {"data_position": 18, "seed": 0}
    assert_same_metrics(full_run.path, cut_run.path, range(1, 7), rtol=1e-5)


def test_resume_with_a_different_config_is_refused(episodes_path, tmp_path):
    cfg = tiny_config(episodes_path, steps=2, checkpoint_every=2)
    run_experiment(cfg, str(tmp_path / "w"), log=lambda _: None)
    other = dataclasses.replace(cfg, loss=LossConfig(objective="echo", lam=0.5))
    with pytest.raises(RunDirError, match=r"loss\.lam: 0\.1 -> 0\.5"):
        run_experiment(other, str(tmp_path / "w"), resume=True, log=lambda _: None)


def _cli(*args, cwd=ROOT):
    return run_module("experiments.train", *args, cwd=cwd)


@pytest.mark.parametrize("objective", ["grpo", "echo", "verifier_free"])
def test_cli_trains_each_objective_on_the_shipped_episode(objective, tmp_path):
    work = tmp_path / objective
    proc = _cli(
        f"--objective={objective}",
        "--steps=3",
        f"--workdir={work}",
        "--log_every=1",
        "--checkpoint_every=3",
        "--d_model=16",
        "--n_layers=1",
        "--max_len=512",
        SHIPPED_EPISODE,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = RunDir(work).read_metrics()
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert all(np.isfinite(m[k]) for m in lines for k in ("loss", "env_ce", "action_ce"))
    assert os.path.isdir(work / "checkpoints" / "3")
    with open(work / "config.json") as f:
        saved = json.load(f)
    assert saved["loss"]["objective"] == objective
    assert "done: 3 steps" in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--objective=ppo"], "flag --objective=ppo"),
        (["--objective=grpo", "--lam=0.1"], "--lam only applies to --objective=echo"),
        (["--lam=-1"], "lam must be >= 0"),
        (["--data=/nonexistent/*.jsonl"], "no episode file matches"),
        (["--max_len=100", SHIPPED_EPISODE], "context prefix"),
    ],
)
def test_cli_rejects_bad_flags_before_any_work(args, message, tmp_path):
    proc = _cli(*args, f"--workdir={tmp_path / 'w'}")
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "w" / "checkpoints")
