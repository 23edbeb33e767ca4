"""The on-policy update's accounting, each expected value derived by hand: an episode counts once
in either term however many rows it spans, token_mean is a mean over tokens, a minibatch with
no gradient makes no optimiser step, and the terms' gradients do not depend on the batching."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from echo_jax.config import Config, LossConfig, RLConfig
from echo_jax.data import roles
from echo_jax.objective.batch import Batch, batch_rows
from echo_jax.objective.fused_loss import model_loss
from echo_jax.objective.loss import FULL_OBS_EPS, echo_loss_from_logprobs
from echo_jax.rl.rows import RolloutBatch, rollout_batch
from echo_jax.rl.update import (
    make_term_gradients_fn,
    signal_rows,
    term_gradients,
    update,
)
from echo_jax.train.sharding import data_parallel
from echo_jax.train.trainer import init_model, init_state, make_optimizer, make_train_step
from tests.test_agent import TINY
from tests.test_rl import hand_record, with_rows

P, C, A, E, W = roles.PAD, roles.CONTEXT, roles.ACTION, roles.ENV_OUTPUT, roles.WARNING


def _batch(logp_BS, roles_BS, adv_B, **weights) -> Batch:
    roles_BT = np.pad(np.asarray(roles_BS), ((0, 0), (1, 0)), constant_values=C)
    return Batch(np.zeros_like(roles_BT), roles_BT, np.asarray(adv_B, np.float32), **weights)


def _loss(logp_BS, batch: Batch, **cfg) -> dict[str, float]:
    _, m = echo_loss_from_logprobs(np.asarray(logp_BS, np.float32), batch, LossConfig(**cfg))
    return {k: float(v) for k, v in m.items()}


# Episode 1: observation CEs 1, 2 | 3, 4, 5, 6 over two rows; episode 2: one row, CEs 10, 20.
CUT_LOGP = -np.array([[0.5, 1, 2, 0, 0, 0], [0.5, 3, 4, 5, 6, 0], [0.5, 10, 20, 0, 0, 0]])
CUT_ROLES = np.array([[A, E, E, P, P, P], [A, E, E, E, E, P], [A, E, E, P, P, P]])


def test_an_episode_over_several_rows_weighs_as_one_in_the_env_term():
    """Per-episode mean CE over the episode's observation tokens, then the mean over episodes:
    (21/6 + 30/2) / 2. Without the row weights, episode 1 would count twice."""
    share = np.array([2 / 6, 4 / 6, 1.0], np.float32)  # Rows' shares of their episode's 6 and 2.
    weighted = _batch(CUT_LOGP, CUT_ROLES, [0, 0, 0], env_row_weight_B=share)
    got = _loss(CUT_LOGP, weighted, objective="verifier_free")["env_loss"]
    want = (21 / 6 + 30 / 2) / 2
    assert got == pytest.approx(want, rel=FULL_OBS_EPS)  # The eps per row moves it by < eps/2.
    unweighted = _loss(CUT_LOGP, _batch(CUT_LOGP, CUT_ROLES, [0, 0, 0]), objective="verifier_free")
    assert unweighted["env_loss"] == pytest.approx((3 / 2 + 18 / 4 + 30 / 2) / 3, rel=FULL_OBS_EPS)
    assert abs(unweighted["env_loss"] - want) > 1.0


def test_rollout_batch_gives_each_row_its_share_of_the_episodes_observations():
    two_rows = (([C, A, A, E, E], [0, 0, 0, 1, 2]), ([C, C, A, E], [0, 0, 0, 3]))
    one_row = ([C, A, E, W, E, C], [0, 0, 1, 4, 1, 0])
    records = [with_rows(hand_record(0), *two_rows), with_rows(hand_record(0), one_row)]
    batch = rollout_batch(records, RLConfig(), max_len=8)
    # Episode 0: 2 + 1 observation targets; episode 1: 3 (ENV_OUTPUT and WARNING alike).
    np.testing.assert_allclose(batch.env_row_weight, [2 / 3, 1 / 3, 1.0], rtol=1e-6)


def test_token_mean_is_a_mean_over_the_action_tokens_of_cut_episodes():
    """One episode cut into rows of 3 and 1 action tokens: its token mean is the plain mean of
    the 4 (the old weighting gave Σa·S / Σa² instead)."""
    logp = -np.array([[0.1, 0.7, 0.3, 0.5], [0.9, 0.5, 0.5, 0.5]])
    role = np.array([[A, A, A, E], [A, E, P, P]])
    adv = 0.8
    batch = _batch(logp, role, [adv, adv], pg_weight_B=np.array([0.75, 0.25], np.float32))
    got = _loss(logp, batch, objective="grpo", pg_loss_reduction="token_mean")["pg_loss"]
    assert got == pytest.approx(-adv * -np.mean([0.1, 0.7, 0.3, 0.9]), rel=1e-6)
    old = -adv * (3 * -1.1 + 1 * -0.9) / (3**2 + 1**2)  # Σa·S / Σa² with S the rows' sums.
    assert got != pytest.approx(old, rel=1e-3)


def _rows(n: int, advantage: float, t: int = 16) -> RolloutBatch:
    """n one-row episodes of CONTEXT, ACTION and ENV_OUTPUT tokens, each with `advantage`."""
    rng = np.random.default_rng(0)
    role = np.array([C] * 4 + [A] * 5 + [E] * 7)
    tokens = rng.integers(1, 50, (n, t)).astype(np.int32)
    return RolloutBatch(
        tokens=tokens,
        roles=np.tile(role, (n, 1)).astype(np.int8),
        sample_logp=np.full((n, t - 1), -3.0, np.float32),
        advantage=np.full(n, advantage, np.float32),
        pg_weight=np.ones(n, np.float32),
        env_weight=np.ones((n, t - 1), np.float32),
        env_row_weight=np.ones(n, np.float32),
        episode=np.arange(n, dtype=np.int32),
        rewards=np.zeros(n, np.float32),
        informative=np.full(n, advantage != 0),
    )


@pytest.fixture(scope="module")
def model():
    cfg = Config(model=TINY)
    graphdef, params = init_model(cfg, 64, 0)
    return cfg, graphdef, params


def _update(model, batch: RolloutBatch, loss: LossConfig, lam: float, **rl):
    cfg, graphdef, params = model
    tx = make_optimizer(cfg.train, schedule=lambda _: 1e-2)
    state = init_state(jax.tree.map(jnp.copy, params), tx)
    rl = RLConfig(epochs=2, minibatch_size=2, **rl)
    step = make_train_step(graphdef, tx, loss)
    new, metrics = update(step, state, batch, lam, rl, loss, np.random.default_rng(0),
                          data_parallel(rl.minibatch_size))  # fmt: skip
    return params, new.params, metrics


def test_a_minibatch_without_gradient_makes_no_optimiser_step(model):
    """grpo on all-fail groups (every advantage 0): a zero gradient, so no step; AdamW's weight
    decay alone would have moved every matrix."""
    batch, grpo = _rows(3, 0.0), LossConfig(objective="grpo")
    before, after, m = _update(model, batch, grpo, 0.0)
    assert m["update_steps"] == 0 and m["skipped_steps"] == 4  # 2 epochs x 2 minibatches.
    chex.assert_trees_all_equal(after, before)
    _, drifted, m = _update(model, batch, grpo, 0.0, skip_empty_updates=False)
    assert m["update_steps"] == 4 and np.isfinite(m["pg_loss"]) and m["pg_loss"] == 0.0
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(drifted), jax.tree.leaves(before), strict=True)
    )
    # The env term is a gradient: echo steps on the same rows, unless λ is 0.
    _, _, m = _update(model, batch, LossConfig(objective="echo"), 0.1)
    assert m["update_steps"] == 4 and m["skipped_steps"] == 0
    assert not signal_rows(batch, 0.0, LossConfig(objective="echo")).any()


def test_signal_rows_reads_advantages_actions_and_env_weights():
    batch = _rows(4, 0.0)
    batch = dataclasses.replace(
        batch,
        advantage=np.array([0, 1, 0, 0], np.float32),
        env_weight=batch.env_weight * np.array([[0], [0], [1], [0]]),
    )
    np.testing.assert_array_equal(signal_rows(batch, 0.5, LossConfig(objective="grpo")),
                                  [False, True, False, False])  # fmt: skip
    np.testing.assert_array_equal(signal_rows(batch, 0.5, LossConfig(objective="echo")),
                                  [False, True, True, False])  # fmt: skip
    np.testing.assert_array_equal(signal_rows(batch, 0.5, LossConfig(objective="verifier_free")),
                                  [False, False, True, False])  # fmt: skip


def _direct_gradients(model, batch: RolloutBatch, loss: LossConfig):
    """∇L_pg and ∇L_env of all rows in one batch, straight from jax.grad."""
    _, graphdef, params = model
    from flax import nnx

    rows = batch_rows(np.arange(batch.num_rows), batch.tokens, batch.roles, batch.advantage,
                      old_logp_NS=batch.sample_logp, pg_weight_N=batch.pg_weight,
                      env_weight_NS=batch.env_weight,
                      env_row_weight_N=batch.env_row_weight)  # fmt: skip

    def term(name):
        return jax.grad(lambda p: model_loss(nnx.merge(graphdef, p), rows, loss)[1][name])(params)

    return term("pg_loss"), term("env_loss")


def _norm(tree) -> float:
    leaves = jax.tree.leaves(tree)
    return float(np.sqrt(sum(np.sum(np.square(x, dtype=np.float64)) for x in leaves)))


def test_term_gradients_are_the_whole_iterations_whatever_the_batching(model):
    """Five rows of unequal weights in batches of 2 (the last padded) give the gradients of the
    terms over all five at once; the env gradient is λ times the unscaled one."""
    _, graphdef, params = model
    batch = _rows(5, 1.0)
    batch = dataclasses.replace(
        batch,
        advantage=np.array([1.0, -0.5, 0.25, 2.0, -1.0], np.float32),
        pg_weight=np.array([1.0, 0.5, 0.5, 1.0, 1.0], np.float32),
        env_row_weight=np.array([1.0, 0.25, 0.75, 1.0, 1.0], np.float32),
    )
    batch.roles[3, 12:] = P  # Rows of different lengths: different denominators.
    loss = LossConfig(objective="echo", lam=0.3, impl="plain")
    want_pg, want_env = _direct_gradients(model, batch, loss)
    got = term_gradients(make_term_gradients_fn(graphdef, loss), params, batch, 0.3, loss, 2,
                         data_parallel(2))  # fmt: skip
    # float32 sums of a few hundred terms in another order: relative error well under 1e-4.
    assert got["grad_norm_pg"] == pytest.approx(_norm(want_pg), rel=1e-4)
    assert got["grad_norm_env_unscaled"] == pytest.approx(_norm(want_env), rel=1e-4)
    assert got["grad_norm_env"] == pytest.approx(0.3 * _norm(want_env), rel=1e-4)
    dot = sum(
        float(np.vdot(a, b))
        for a, b in zip(jax.tree.leaves(want_pg), jax.tree.leaves(want_env), strict=True)
    )
    assert got["grad_cos"] == pytest.approx(dot / (_norm(want_pg) * _norm(want_env)), abs=1e-4)
    grpo = LossConfig(objective="grpo", impl="plain")
    flat = term_gradients(make_term_gradients_fn(graphdef, grpo), params, _rows(3, 0.0), 0.0,
                          grpo, 2, data_parallel(2))  # fmt: skip
    assert flat["grad_norm_pg"] == 0.0 and flat["grad_norm_env"] == 0.0
    assert flat["grad_norm_env_unscaled"] > 0 and np.isnan(flat["grad_cos"])


# --- difficulty bands, the band pool, and the per-task metrics ------------------------------


def test_bands_follow_the_sampled_rate_and_the_scripted_success():
    from echo_jax.rl.difficulty import band_of

    assert band_of(0, 16, scripted_successes=3) == "zero"
    assert band_of(0, 16, scripted_successes=0) == "unsolved"
    assert band_of(3, 16, 0) == "low"  # 0.1875 <= 0.2
    assert band_of(4, 16, 0) == "mid"  # 0.25
    assert band_of(11, 16, 0) == "mid" and band_of(12, 16, 0) == "high"  # 0.6875, 0.75


def _table(rows):
    keys = ("scenario", "task_idx", "template", "domain", "band")
    tasks = [dict(zip(keys, r, strict=True), sampled_pass=0.0) for r in rows]
    return {"tasks": tasks, "band_counts": {}}


def test_band_pool_spreads_over_templates_and_domains():
    from echo_jax.rl.pool import band_pool

    table = _table([
        ("e_commerce_1", 0, "cart", "e_commerce", "zero"),
        ("e_commerce_1", 1, "cart", "e_commerce", "zero"),
        ("e_commerce_2", 0, "cart", "e_commerce", "zero"),
        ("e_commerce_2", 1, "refund", "e_commerce", "zero"),
        ("clinic_1", 0, "book", "clinic", "zero"),
        ("clinic_1", 1, "cancel", "clinic", "low"),
        ("clinic_2", 0, "cancel", "clinic", "low"),
        ("library_1", 0, "cart", "library", "mid"),
    ])  # fmt: skip
    pool = band_pool(table, {"zero": 3, "low": 1}, seed=0)
    zero = [k for k, b in pool["bands"].items() if b == "zero"]
    assert len(zero) == 3 and len(pool["tasks"]) == 4
    # Three zero tasks from three templates (cart, refund, book), both zero domains among them.
    assert {"cart", "refund", "book"} <= set(pool["templates"])
    assert pool["domains"] == ["clinic", "e_commerce"]
    assert band_pool(table, {"zero": 3, "low": 1}, seed=0) == pool  # Seeded: the same pool.
    with pytest.raises(ValueError, match="wants 3 'low' tasks; the table has 2"):
        band_pool(table, {"zero": 1, "low": 3}, seed=0)


def test_task_metrics_count_groups_and_bands():
    from echo_jax.rl.loop import task_metrics

    def rec(scenario, task_idx, won):
        return {"scenario": scenario, "task_idx": task_idx,
                "step_reward_types": ["tool_call_ok", "complete" if won else "others"]}  # fmt: skip

    records = [rec("a", 0, False), rec("a", 0, False), rec("a", 1, True), rec("a", 1, False),
               rec("b", 0, True), rec("b", 0, True)]  # fmt: skip
    m = task_metrics(records, {"a/0": "zero", "a/1": "zero", "b/0": "low"})
    assert m["task_successes"] == {"a/0": 0, "a/1": 1, "b/0": 2}
    assert m["all_fail_groups"] == pytest.approx(1 / 3)
    assert m["all_success_groups"] == pytest.approx(1 / 3)
    assert m["success_zero"] == pytest.approx(1 / 4) and m["success_low"] == 1.0


def test_difficulty_table_reads_probes_templates_and_the_corpus(tmp_path):
    """Task 0 of shop_1 is won by half its scripted episodes and never by the probe: "zero";
    the probe wins task 1 in 1 of 4 samples: rate 0.25, "mid"."""
    import json

    from echo_jax.rl.difficulty import difficulty_table
    from tests.corpus_fixture import make_tiny_corpus

    corpus_dir = make_tiny_corpus(tmp_path / "corpus", scenarios=("shop_1",), tasks=2, per_task=2)
    worlds = tmp_path / "worlds"
    worlds.mkdir()
    with open(worlds / "echo_task_params.jsonl", "w") as f:
        for t, template in enumerate(("buy", "return")):
            f.write(json.dumps({"scenario": "shop_1", "task_idx": t, "template": template,
                                "params": {}}) + "\n")  # fmt: skip

    class Engine:  # Task 1's second sample succeeds; every greedy rollout fails.
        def run(self, requests):
            return [{"steps": [{}] * 3,
                     "step_reward_types": ["complete" if (r.task_idx, r.tag["sample"]) == (1, 1)
                                           and r.temperature > 0 else "others"]}
                    for r in requests]  # fmt: skip

    table = difficulty_table(Engine(), [("shop_1", 0), ("shop_1", 1)], str(worlds), corpus_dir,
                             samples=4, seed=0)  # fmt: skip
    rows = {r["task_idx"]: r for r in table["tasks"]}
    assert rows[0]["template"] == "buy" and rows[0]["domain"] == "shop"
    assert rows[0]["scripted_success"] == 0.5 and rows[0]["scripted_episodes"] == 2
    assert rows[0]["sampled_successes"] == 0 and rows[0]["band"] == "zero"
    assert rows[1]["sampled_pass"] == 0.25 and rows[1]["band"] == "mid"
    assert table["band_counts"]["zero"] == 1 and table["probe_env_steps"] == 3 * (8 + 2)
