"""The objective registry: an objective added from outside the package trains through the real
train step, and unknown names fail; and the one function that builds every Batch."""

import dataclasses

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from echo_jax.config import ConfigError, LossConfig
from echo_jax.data import roles
from echo_jax.objective import objectives
from echo_jax.objective.batch import batch_rows
from echo_jax.objective.loss import echo_loss
from echo_jax.objective.objectives import Objective, objective_spec
from echo_jax.reports import sweep
from echo_jax.train.trainer import make_train_step
from tests.test_train import episodes_path as episodes_path  # noqa: F401  (fixture)
from tests.test_train import one_step, tiny_config

TOY = "env_plus_half_action"  # Registered here and nowhere else: L_env + 0.5 · L_pg.


@pytest.fixture
def toy():
    objectives.register_objective(TOY, Objective(policy=0.5, env=1.0))
    yield TOY
    objectives.unregister_objective(TOY)


def test_a_registered_objective_trains_through_the_train_step(toy, episodes_path):  # noqa: F811
    """Its step is the optax update of 0.5 · (the grpo loss) + (the verifier_free loss), each
    of those computed by the built-in objectives on the same batch."""
    cfg = dataclasses.replace(tiny_config(episodes_path), loss=LossConfig(objective=toy))
    graphdef, tx, state, batch = one_step(cfg)

    def want_loss(params):
        logits = nnx.merge(graphdef, params)(batch.tokens_BT)
        pg = echo_loss(logits, batch, LossConfig(objective="grpo"))[0]
        env = echo_loss(logits, batch, LossConfig(objective="verifier_free"))[0]
        return 0.5 * pg + env

    want, grads = jax.jit(jax.value_and_grad(want_loss))(state.params)
    updates, _ = tx.update(grads, state.opt_state, state.params)
    want_params = jax.tree.map(np.asarray, optax.apply_updates(state.params, updates))
    new_state, metrics = make_train_step(graphdef, tx, cfg.loss)(state, batch)
    assert float(metrics["pg_loss"]) != 0 and float(metrics["env_loss"]) != 0
    np.testing.assert_allclose(float(metrics["loss"]), float(want), rtol=1e-5)
    np.testing.assert_allclose(
        float(metrics["loss"]), 0.5 * metrics["pg_loss"] + metrics["env_loss"], rtol=1e-6
    )
    for got, w in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(want_params), strict=True):
        np.testing.assert_allclose(np.asarray(got), w, rtol=1e-5, atol=1e-6)


def test_the_registry_is_what_configs_flags_and_sweeps_read(toy):
    assert toy in objectives.OBJECTIVES and list(objectives.OBJECTIVES)[:3] == [
        "grpo",
        "echo",
        "verifier_free",
    ]
    assert objective_spec(toy).uses_reward and not objective_spec(toy).uses_lam
    # A sweep gives an objective one arm per λ exactly when λ scales its env term.
    assert [a.name for a in sweep.arms([toy, "echo"], [0.1, 0.5])] == [
        toy,
        "echo_lam0.1",
        "echo_lam0.5",
    ]
    scaled = "env_times_lam_twice"
    objectives.register_objective(scaled, Objective(env=2.0, env_times_lam=True))
    try:
        assert [a.name for a in sweep.arms([scaled], [0.1])] == [f"{scaled}_lam0.1"]
    finally:
        objectives.unregister_objective(scaled)
    assert scaled not in objectives.OBJECTIVES


def test_unknown_or_conflicting_objectives_are_refused(toy):
    for name in ("ppo", "ENV_PLUS_HALF_ACTION"):
        with pytest.raises(ConfigError, match=f"objective='{name}' is not one of grpo, echo"):
            LossConfig(objective=name)
    with pytest.raises(ConfigError, match="not one of"):
        sweep.arms(["ppo"], [0.1])
    with pytest.raises(ConfigError, match="already registered"):
        objectives.register_objective("echo", Objective(policy=1.0, env=1.0))
    objectives.register_objective(toy, Objective(policy=0.5, env=1.0))  # The same again: no change.
    with pytest.raises(ConfigError, match="weights"):
        Objective(policy=0.0, env=0.0)
    with pytest.raises(ConfigError, match="weights"):
        Objective(policy=-1.0, env=1.0)


def test_an_unregistered_objective_is_unknown_again(toy):
    LossConfig(objective=toy)
    objectives.unregister_objective(toy)
    try:
        with pytest.raises(ConfigError, match=f"objective='{toy}'"):
            LossConfig(objective=toy)
    finally:
        objectives.register_objective(toy, Objective(policy=0.5, env=1.0))  # For the fixture.


def test_batch_rows_pads_with_empty_rows_and_stacks():
    n, t = 3, 5
    tokens = np.arange(n * t, dtype=np.int64).reshape(n, t)
    role = np.full((n, t), roles.ACTION, np.int8)
    adv = np.array([1.0, 2.0, 3.0])
    weights = np.ones((n, t - 1), np.float32)
    batch = batch_rows(np.array([2, -1]), tokens, role, adv, env_weight_NS=weights, lam=0.25)
    np.testing.assert_array_equal(batch.tokens_BT, [tokens[2], np.zeros(t)])
    np.testing.assert_array_equal(batch.roles_BT[1], roles.PAD)
    np.testing.assert_array_equal(batch.advantages_B, [3.0, 0.0])
    np.testing.assert_array_equal(batch.env_weight_BS.sum(axis=1), [t - 1, 0])
    np.testing.assert_array_equal(batch.lam_B, [0.25, 0.25])
    assert batch.old_logp_BS is None and batch.pg_weight_B is None
    assert batch.tokens_BT.dtype == np.int32 and batch.roles_BT.dtype == np.int32
    assert batch.advantages_B.dtype == np.float32 and batch.env_weight_BS.dtype == np.float32
    stacked = batch_rows(np.array([[0, 1], [2, 0]]), tokens, role, adv)
    assert stacked.tokens_BT.shape == (2, 2, t) and stacked.advantages_B.shape == (2, 2)
    with pytest.raises(ValueError, match=r"old_logp has shape \(3, 5\)"):
        batch_rows(np.array([0]), tokens, role, adv, old_logp_NS=np.zeros((n, t)))
