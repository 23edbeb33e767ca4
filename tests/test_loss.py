import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

from echo_jax.config import ConfigError, LossConfig
from echo_jax.data import roles
from echo_jax.objective.batch import Batch
from echo_jax.objective.loss import echo_loss
from tests.reference_loss import reference_echo_loss

B, T, V = 5, 13, 17  # Primes, so a transposed axis cannot pass a shape check by accident.
OPTION_GRID = list(
    itertools.product(
        ("grpo", "echo", "verifier_free"),
        ("env_only", "all"),
        ("full_observation_tokens", "token_mean"),
        ("sequence_mean", "token_mean"),
        (False, True),  # PPO-clip with old log-probs
        (False, True),  # env_weight filter
    )
)


def random_inputs(seed: int = 0, b: int = B, t: int = T, v: int = V):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(b, t, v)).astype(np.float32) * 2
    tokens = rng.integers(0, v, size=(b, t)).astype(np.int32)
    role = rng.choice(
        [roles.CONTEXT, roles.ACTION, roles.ENV_OUTPUT, roles.WARNING], size=(b, t)
    ).astype(np.int32)
    role[0, -4:] = roles.PAD  # One padded row end.
    role[1, :] = roles.CONTEXT  # A row with no targets of any kind.
    advantages = rng.normal(size=(b,)).astype(np.float32)
    old_logp = (np.log(rng.uniform(0.02, 0.9, size=(b, t - 1)))).astype(np.float32)
    env_weight = np.array([1, 0, 1, 1, 0][:b], np.float32)
    return logits, tokens, role, advantages, old_logp, env_weight


def batch(tokens, role, adv, old_logp=None, env_weight_B=None) -> Batch:
    """A Batch; a per-row env weight [B] is given to every target of its row."""
    env_weight_BS = None
    if env_weight_B is not None:
        env_weight_BS = np.repeat(np.asarray(env_weight_B)[:, None], tokens.shape[1] - 1, axis=1)
    return Batch(tokens, role, adv, old_logp_BS=old_logp, env_weight_BS=env_weight_BS)


@pytest.mark.parametrize("option", OPTION_GRID, ids=lambda o: "-".join(map(str, o)))
def test_matches_independent_reference(option):
    objective, target, normalization, reduction, use_old, use_weight = option
    logits, tokens, role, adv, old_logp, env_weight = random_inputs(seed=hash(option) % 1000)
    kwargs = dict(
        objective=objective,
        lam=0.37,
        world_loss_target=target,
        world_loss_normalization=normalization,
        pg_loss_reduction=reduction,
    )
    loss, metrics = echo_loss(
        logits,
        batch(
            tokens,
            role,
            adv,
            old_logp=old_logp if use_old else None,
            env_weight_B=env_weight if use_weight else None,
        ),
        LossConfig(**kwargs),
    )
    want = reference_echo_loss(
        logits,
        tokens,
        role,
        adv,
        old_logp=old_logp if use_old else None,
        env_weight=env_weight if use_weight else None,
        **kwargs,
    )
    for key, value in want.items():
        np.testing.assert_allclose(float(metrics[key]), value, rtol=1e-5, atol=1e-5, err_msg=key)
    np.testing.assert_allclose(float(loss), want["loss"], rtol=1e-5, atol=1e-5)


class EchoLossVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_shapes_types_and_finite(self):
        logits, tokens, role, adv, old_logp, _ = random_inputs()
        fn = self.variant(functools.partial(echo_loss, cfg=LossConfig(objective="echo", lam=0.1)))
        loss, metrics = fn(logits, batch(tokens, role, adv, old_logp=old_logp))
        chex.assert_shape(loss, ())
        chex.assert_type(loss, jnp.float32)
        chex.assert_tree_all_finite((loss, metrics))
        for key in ("loss", "pg_loss", "env_ce", "action_ce", "n_action", "n_env", "clip_frac"):
            self.assertIn(key, metrics)
            chex.assert_shape(metrics[key], ())

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("grpo", "echo", "verifier_free")
    def test_empty_masks_give_zero_not_nan(self, objective):
        logits, tokens, _, adv, _, _ = random_inputs()
        all_pad = np.zeros((B, T), np.int32)
        fn = self.variant(functools.partial(echo_loss, cfg=LossConfig(objective=objective)))
        loss, metrics = fn(logits, batch(tokens, all_pad, adv))
        self.assertEqual(float(loss), 0.0)
        chex.assert_tree_all_finite(metrics)

    @chex.variants(with_jit=True, without_jit=True)
    def test_gradients_finite_and_zero_where_no_target(self):
        logits, tokens, role, adv, _, _ = random_inputs()
        cfg = LossConfig(objective="echo", lam=0.5)
        fn = self.variant(jax.grad(lambda lg: echo_loss(lg, batch(tokens, role, adv), cfg)[0]))
        grad = np.asarray(fn(jnp.asarray(logits)))
        chex.assert_tree_all_finite(grad)
        chex.assert_shape(grad, (B, T, V))
        np.testing.assert_array_equal(grad[:, -1], 0.0)  # The last position predicts nothing.
        target_role = role[:, 1:]
        no_target = (target_role == roles.PAD) | (target_role == roles.CONTEXT)
        np.testing.assert_array_equal(grad[:, :-1][no_target], 0.0)
        self.assertGreater(np.abs(grad[:, :-1][~no_target]).sum(), 0.0)


def _loss(objective, lam=0.05, **kw):
    logits, tokens, role, adv, _, _ = random_inputs(seed=3)
    args = dict(logits=kw.pop("logits", logits), tokens=kw.pop("tokens", tokens))
    role = kw.pop("role", role)
    adv = kw.pop("adv", adv)
    cfg = LossConfig(objective=objective, lam=lam, **kw)
    return echo_loss(args["logits"], batch(args["tokens"], role, adv), cfg)


def test_lambda_zero_is_grpo():
    np.testing.assert_allclose(_loss("echo", lam=0.0)[0], _loss("grpo")[0], rtol=1e-6)


def test_env_term_is_linear_in_lambda():
    pg = float(_loss("grpo")[0])
    env = float(_loss("verifier_free")[0])
    for lam in (0.005, 0.05, 0.5, 3.0):
        np.testing.assert_allclose(float(_loss("echo", lam=lam)[0]), pg + lam * env, rtol=1e-5)


def test_verifier_free_is_pure_env_cross_entropy_and_ignores_rewards():
    logits, tokens, role, adv, _, _ = random_inputs(seed=3)
    cfg = LossConfig(objective="verifier_free", world_loss_normalization="token_mean")
    loss, _ = echo_loss(logits, batch(tokens, role, adv), cfg)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
    mask = role[:, 1:] == roles.ENV_OUTPUT
    np.testing.assert_allclose(float(loss), float(ce[mask].mean()), rtol=1e-5)
    other, _ = echo_loss(logits, batch(tokens, role, -3 * adv), cfg)
    np.testing.assert_allclose(float(other), float(loss), rtol=1e-6)


@pytest.mark.parametrize("objective", ["grpo", "echo", "verifier_free"])
def test_padding_and_context_never_count(objective):
    logits, tokens, role, adv, _, _ = random_inputs(seed=5)
    base = float(_loss(objective, logits=logits, tokens=tokens, role=role, adv=adv)[0])
    # Change every logit row and label whose target is PAD or CONTEXT: nothing may move.
    rng = np.random.default_rng(9)
    ignored = np.zeros((B, T), bool)
    ignored[:, :-1] = (role[:, 1:] == roles.PAD) | (role[:, 1:] == roles.CONTEXT)
    noisy = np.where(ignored[..., None], rng.normal(size=logits.shape) * 10, logits)
    new_tokens = tokens.copy()
    new_tokens[:, 1:] = np.where(ignored[:, :-1], rng.integers(0, V, (B, T - 1)), tokens[:, 1:])
    changed = float(
        _loss(objective, logits=noisy.astype(np.float32), tokens=new_tokens, role=role, adv=adv)[0]
    )
    np.testing.assert_allclose(changed, base, rtol=1e-6)
    # Appending PAD columns changes nothing either.
    pad = 7
    padded_logits = np.concatenate([logits, rng.normal(size=(B, pad, V)).astype(np.float32)], 1)
    padded_tokens = np.concatenate([tokens, rng.integers(0, V, (B, pad)).astype(np.int32)], 1)
    padded_role = np.concatenate([role, np.zeros((B, pad), np.int32)], 1)
    longer = float(
        _loss(objective, logits=padded_logits, tokens=padded_tokens, role=padded_role, adv=adv)[0]
    )
    np.testing.assert_allclose(longer, base, rtol=1e-6)


def test_warning_excluded_under_env_only_and_included_under_all():
    logits, tokens, role, adv, _, _ = random_inputs(seed=11)
    flip = role.copy()
    flip[role == roles.WARNING] = roles.ENV_OUTPUT
    kw = dict(objective="verifier_free", world_loss_normalization="token_mean")

    def env_ce(r, target):
        cfg = LossConfig(world_loss_target=target, **kw)
        return float(echo_loss(logits, batch(tokens, r, adv), cfg)[0])

    # Under "all", WARNING targets count exactly as ENV_OUTPUT ones would.
    np.testing.assert_allclose(env_ce(role, "all"), env_ce(flip, "env_only"), rtol=1e-6)
    # Under "env_only", WARNING targets count like CONTEXT (not at all).
    as_context = role.copy()
    as_context[role == roles.WARNING] = roles.CONTEXT
    np.testing.assert_allclose(env_ce(role, "env_only"), env_ce(as_context, "env_only"), rtol=1e-6)
    assert abs(env_ce(role, "all") - env_ce(role, "env_only")) > 1e-4


@pytest.mark.parametrize("normalization", ["full_observation_tokens", "token_mean"])
def test_env_weight_zero_removes_an_episode(normalization):
    logits, tokens, role, adv, _, _ = random_inputs(seed=13)
    weight = np.ones(B, np.float32)
    weight[2] = 0.0
    cfg = LossConfig(objective="verifier_free", world_loss_normalization=normalization)
    filtered = float(echo_loss(logits, batch(tokens, role, adv, env_weight_B=weight), cfg)[0])
    keep = np.arange(B) != 2
    dropped = float(echo_loss(logits[keep], batch(tokens[keep], role[keep], adv[keep]), cfg)[0])
    np.testing.assert_allclose(filtered, dropped, rtol=1e-6)


def test_ppo_clip_fraction_and_on_policy_ratio():
    logits, tokens, role, adv, _, _ = random_inputs(seed=17)
    logp = jax.nn.log_softmax(logits[:, :-1])
    on_policy = np.take_along_axis(np.asarray(logp), tokens[:, 1:, None], -1)[..., 0]
    grpo = LossConfig(objective="grpo")
    _, on = echo_loss(logits, batch(tokens, role, adv, old_logp=on_policy), grpo)
    _, off = echo_loss(logits, batch(tokens, role, adv, old_logp=on_policy - 1.0), grpo)
    _, plain = echo_loss(logits, batch(tokens, role, adv), grpo)
    assert float(on["clip_frac"]) == 0.0
    np.testing.assert_allclose(float(off["clip_frac"]), 1.0)  # ratio = e > 1.2 everywhere
    # At ratio 1 the PPO surrogate's value is -A (its gradient is REINFORCE's).
    np.testing.assert_allclose(
        float(on["pg_loss"]),
        float(np.mean([-adv[b] for b in range(B) if (role[b, 1:] == roles.ACTION).any()])),
        rtol=1e-5,
    )
    assert float(plain["pg_loss"]) != float(on["pg_loss"])


@pytest.mark.parametrize(
    "option",
    [
        {"objective": "ppo"},
        {"world_loss_target": "warnings"},
        {"world_loss_normalization": "row_mean"},
        {"pg_loss_reduction": "sum"},
        {"advantage": "baseline"},
        {"impl": "fused"},
    ],
)
def test_bad_option_is_a_clear_error(option):
    """Refused where the options are built, naming the option, the value and the choices."""
    (value,) = option.values()
    with pytest.raises(ConfigError, match=rf"{value!r} is not one of \w+"):
        LossConfig(**option)


def test_dispatch_on_an_unknown_name_fails_rather_than_falling_through():
    """Below the config too: a name that reaches a branch unchecked raises."""
    from echo_jax.objective.fused_loss import resolve_impl
    from echo_jax.objective.loss import world_targets

    with pytest.raises(ConfigError, match="world_loss_target='warnings'"):
        world_targets(np.zeros((1, 3), np.int32), "warnings")
    with pytest.raises(ConfigError, match="loss impl='fused'"):
        resolve_impl("fused")


def test_per_row_lambda_weighs_each_rows_env_share():
    """lam_B: the env term's rows each times their λ, over the same denominator, so it is linear
    in lam_B, its one-hot parts add up to L_env, and a constant lam_B is LossConfig.lam."""
    logits, tokens, role, adv, _, _ = random_inputs(seed=19)
    for normalization in ("full_observation_tokens", "token_mean"):
        cfg = LossConfig(objective="echo", lam=0.3, world_loss_normalization=normalization)

        def loss(lam_B, cfg=cfg):
            return echo_loss(logits, batch(tokens, role, adv)._replace(lam_B=lam_B), cfg)

        pg, env = float(loss(None)[1]["pg_loss"]), float(loss(None)[1]["env_loss"])
        shares = [float(loss(np.eye(B, dtype=np.float32)[b])[0]) - pg for b in range(B)]
        np.testing.assert_allclose(sum(shares), env, rtol=1e-5)
        lam_B = np.array([0.0, 0.1, 0.2, 0.7, 1.3], np.float32)
        np.testing.assert_allclose(float(loss(lam_B)[0]), pg + lam_B @ shares, rtol=1e-5)
        np.testing.assert_allclose(
            float(loss(np.full(B, 0.3, np.float32))[0]), float(loss(None)[0]), rtol=1e-6
        )
        assert len({round(s, 6) for s in shares}) > 2  # Rows differ: a real per-row test.
