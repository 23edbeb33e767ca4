"""The chunked loss (output projection fused with the cross-entropy) against the plain one."""

import dataclasses
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from echo_jax.config import Config, LossConfig, ModelConfig, TrainConfig
from echo_jax.data import roles
from echo_jax.model.matmul import matmul
from echo_jax.model.transformer import Transformer
from echo_jax.objective import loss as loss_module
from echo_jax.objective.batch import Batch
from echo_jax.objective.fused_loss import chunked_label_logprobs, model_echo_loss, resolve_impl
from echo_jax.objective.loss import echo_loss, label_logprobs
from echo_jax.train.trainer import init_model, init_state, make_optimizer, make_train_step

B, T, V = 3, 17, 251  # B·(T-1) = 48 targets.
CFG = ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32)


def random_batch(seed=0, b=B, t=T, v=V) -> Batch:
    rng = np.random.default_rng(seed)
    role = rng.choice([roles.CONTEXT, roles.ACTION, roles.ENV_OUTPUT, roles.WARNING], (b, t))
    role[0, -3:] = roles.PAD
    return Batch(
        tokens_BT=jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32),
        roles_BT=jnp.asarray(role, jnp.int32),
        advantages_B=jnp.asarray(rng.normal(size=(b,)), jnp.float32),
    )


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def autodiff_logprobs(logits_BTV, tokens_BT):
    """The textbook formulation, differentiated by JAX: the reference for both custom VJPs."""
    logp_BSV = jax.nn.log_softmax(logits_BTV[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp_BSV, tokens_BT[:, 1:, None], axis=-1)[..., 0]


@pytest.mark.parametrize("block_bytes", [4 * V, 4 * V * 5, 1 << 22])  # 1, 3 and all 51 rows
def test_plain_label_logprobs_blocks_match_autodiff(block_bytes, monkeypatch):
    monkeypatch.setattr(loss_module, "_ROW_BLOCK_BYTES", block_bytes)
    rng = np.random.default_rng(6)
    logits = jnp.asarray(rng.normal(size=(B, T, V)) * 3, jnp.float32)
    tokens = random_batch(seed=6).tokens_BT
    g_BS = jnp.asarray(rng.normal(size=(B, T - 1)), jnp.float32)
    want, want_g = jax.value_and_grad(lambda x: (autodiff_logprobs(x, tokens) * g_BS).sum())(logits)
    got, got_g = jax.jit(jax.value_and_grad(lambda x: (label_logprobs(x, tokens) * g_BS).sum()))(
        logits
    )
    assert rel_err(got, want) <= 1e-5 and rel_err(got_g, want_g) <= 1e-5
    np.testing.assert_array_equal(np.asarray(got_g)[:, -1], 0.0)  # Predicts nothing.


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_label_logprobs_and_their_gradients_match_the_plain_path(chunk):
    rng = np.random.default_rng(1)
    h_BTD = jnp.asarray(rng.normal(size=(B, T, 8)), jnp.float32)
    w_DV = jnp.asarray(rng.normal(size=(8, V)), jnp.float32)
    tokens = random_batch().tokens_BT
    g_BS = jnp.asarray(rng.normal(size=(B, T - 1)), jnp.float32)

    def plain(h, w):
        return (autodiff_logprobs(jnp.einsum("btd,dv->btv", h, w), tokens) * g_BS).sum()

    def fused(h, w):
        return (chunked_label_logprobs(h[:, :-1], w, tokens[:, 1:], None, chunk) * g_BS).sum()

    want = jax.value_and_grad(plain, argnums=(0, 1))(h_BTD, w_DV)
    got = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(h_BTD, w_DV)
    assert rel_err(got[0], want[0]) <= 1e-5
    for g, w in zip(got[1], want[1], strict=True):
        assert rel_err(g, w) <= 1e-5


@pytest.mark.parametrize(
    "objective, tie", [("grpo", True), ("echo", False), ("verifier_free", True)]
)
def test_model_loss_and_parameter_gradients_match_the_plain_path(objective, tie):
    model = Transformer(dataclasses.replace(CFG, tie_embeddings=tie), V, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    batch = random_batch(seed=2)
    cfg = LossConfig(objective=objective, lam=0.3, chunk_size=10)

    def plain(p):
        return echo_loss(nnx.merge(graphdef, p)(batch.tokens_BT), batch, cfg)

    def fused(p):
        return model_echo_loss(nnx.merge(graphdef, p), batch, cfg)

    (want, want_m), want_g = jax.jit(jax.value_and_grad(plain, has_aux=True))(params)
    (got, got_m), got_g = jax.jit(jax.value_and_grad(fused, has_aux=True))(params)
    assert rel_err(got, want) <= 1e-5
    for key in ("pg_loss", "env_loss", "env_ce", "action_ce"):
        assert rel_err(got_m[key], want_m[key]) <= 1e-5, key
    for (path, g), w in zip(
        jax.tree_util.tree_leaves_with_path(got_g), jax.tree.leaves(want_g), strict=True
    ):
        assert rel_err(g, w) <= 1e-5, jax.tree_util.keystr(path)


def test_ppo_clip_old_logprobs_pass_through():
    model = Transformer(CFG, V, rngs=nnx.Rngs(0))
    batch = random_batch(seed=3)
    old = jnp.asarray(np.log(np.random.default_rng(3).uniform(0.01, 0.5, (B, T - 1))), jnp.float32)
    batch = batch._replace(old_logp_BS=old)
    cfg = LossConfig(chunk_size=16)
    want, _ = echo_loss(model(batch.tokens_BT), batch, cfg)
    got, metrics = model_echo_loss(model, batch, cfg)
    assert rel_err(got, want) <= 1e-5
    assert float(metrics["clip_frac"]) > 0


def test_train_step_is_the_same_with_either_impl():
    cfg = Config(model=CFG, train=TrainConfig(steps=4, batch_size=B))
    tx = make_optimizer(cfg.train)
    graphdef, params = init_model(cfg, V, 0)
    batch = random_batch(seed=4)
    out = {}
    for impl in ("plain", "chunked"):
        loss_cfg = LossConfig(impl=impl, chunk_size=13)
        state = init_state(jax.tree.map(jnp.array, params), tx)
        state, metrics = make_train_step(graphdef, tx, loss_cfg)(state, batch)
        out[impl] = (float(metrics["loss"]), jax.tree.map(np.asarray, state.params))
    assert rel_err(out["chunked"][0], out["plain"][0]) <= 1e-5
    chex.assert_trees_all_close(out["chunked"][1], out["plain"][1], rtol=1e-5, atol=1e-6)


def _big_buffers(hlo: str, min_elements: int) -> list[str]:
    """Array shapes in compiled HLO with at least `min_elements` elements."""
    found = []
    for dims in re.findall(r"[fsu]\d+\[([\d,]+)\]", hlo):
        n = int(np.prod([int(d) for d in dims.split(",")]))
        if n >= min_elements:
            found.append(dims)
    return found


def test_no_batch_by_time_by_vocab_array_in_forward_or_backward():
    b, t, v = 2, 64, 4093
    model = Transformer(CFG, v, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    batch = random_batch(seed=5, b=b, t=t, v=v)
    cfg = LossConfig(chunk_size=16)

    def fused(p):
        return model_echo_loss(nnx.merge(graphdef, p), batch, cfg)[0]

    def plain(p):
        return echo_loss(nnx.merge(graphdef, p)(batch.tokens_BT), batch, cfg)[0]

    limit = b * (t - 1) * v // 4  # Chunks of 16 of 126 targets hold an eighth of them.
    fused_hlo = jax.jit(jax.grad(fused)).lower(params).compile().as_text()
    plain_hlo = jax.jit(jax.grad(plain)).lower(params).compile().as_text()
    assert _big_buffers(plain_hlo, limit), "the check would not see a [B, T, V] array"
    assert not _big_buffers(fused_hlo, limit)


@pytest.mark.parametrize("world_loss_target", ["env_only", "all"])
@pytest.mark.parametrize("objective", ["grpo", "echo", "verifier_free"])
def test_nothing_outside_the_counted_targets_reaches_the_loss_or_its_metrics(
    objective, world_loss_target
):
    """What licenses the fused path to skip them: the loss and every metric read log-probs only
    at `counted_targets`, so a target outside it has a zero derivative in all of them."""
    batch = random_batch(seed=8)
    target_roles = batch.roles_BT[:, 1:]
    old = jnp.full(target_roles.shape, -1.0)
    logp = jnp.asarray(np.random.default_rng(8).uniform(-5, -0.1, target_roles.shape), jnp.float32)
    counted = np.asarray(loss_module.counted_targets(target_roles, world_loss_target))
    assert counted.any() and not counted.all()
    cfg = LossConfig(objective=objective, lam=0.3, world_loss_target=world_loss_target)
    for old_logp in (None, old):

        def outputs(lp, old_logp=old_logp):
            loss, metrics = loss_module.echo_loss_from_logprobs(
                lp, batch._replace(old_logp_BS=old_logp), cfg
            )
            return {"loss": loss, **metrics}

        for name, jac in jax.jacrev(outputs)(logp).items():
            np.testing.assert_array_equal(np.asarray(jac)[~counted], 0.0, err_msg=name)


def test_skipped_targets_are_zero_and_the_counted_ones_exact():
    rng = np.random.default_rng(9)
    h_BTD = jnp.asarray(rng.normal(size=(B, T, 8)), jnp.float32)
    w_DV = jnp.asarray(rng.normal(size=(8, V)), jnp.float32)
    batch = random_batch(seed=9)
    tokens, counted = batch.tokens_BT, loss_module.counted_targets(batch.roles_BT[:, 1:])
    g_BS = jnp.asarray(rng.normal(size=(B, T - 1)), jnp.float32)

    def fused(h, w, mask):
        return (chunked_label_logprobs(h[:, :-1], w, tokens[:, 1:], mask, 5) * g_BS).sum()

    def logprobs(h, w, mask):
        return chunked_label_logprobs(h[:, :-1], w, tokens[:, 1:], mask, 5)

    full, masked = jax.jit(logprobs)(h_BTD, w_DV, None), jax.jit(logprobs)(h_BTD, w_DV, counted)
    counted = np.asarray(counted)
    np.testing.assert_array_equal(np.asarray(masked)[~counted], 0.0)
    np.testing.assert_allclose(np.asarray(masked)[counted], np.asarray(full)[counted], rtol=1e-6)
    # The gradient of the counted targets alone, against the unmasked path with g zeroed.
    g_counted = jnp.where(counted, g_BS, 0.0)
    want = jax.grad(
        lambda h, w: (
            chunked_label_logprobs(h[:, :-1], w, tokens[:, 1:], None, 5) * g_counted
        ).sum(),
        argnums=(0, 1),
    )(h_BTD, w_DV)
    got = jax.jit(jax.grad(fused, argnums=(0, 1)))(h_BTD, w_DV, jnp.asarray(counted))
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) <= 1e-5


@pytest.mark.parametrize("chunk", [8, 9])  # Tail pieces of 2; 9 is not a multiple of them.
def test_every_count_of_counted_targets_is_projected_exactly_once(chunk):
    """Whole chunks, then the tail in pieces (fused_loss.TAIL_PIECES): at every count around
    their edges, each counted target gets its exact log-prob and gradient, and no other."""
    rng = np.random.default_rng(11)
    h_BTD = jnp.asarray(rng.normal(size=(B, T, 8)), jnp.float32)
    w_DV = jnp.asarray(rng.normal(size=(8, V)), jnp.float32)
    tokens = random_batch(seed=11).tokens_BT
    g_BS = jnp.asarray(rng.normal(size=(B, T - 1)), jnp.float32)

    def plain(h, w, mask):
        logp = autodiff_logprobs(jnp.einsum("btd,dv->btv", h, w), tokens)
        return (jnp.where(mask, logp, 0.0) * g_BS).sum(), jnp.where(mask, logp, 0.0)

    def fused(h, w, mask):
        logp = chunked_label_logprobs(h[:, :-1], w, tokens[:, 1:], mask, chunk)
        return (logp * g_BS).sum(), logp

    want_fn = jax.jit(jax.value_and_grad(plain, argnums=(0, 1), has_aux=True))
    got_fn = jax.jit(jax.value_and_grad(fused, argnums=(0, 1), has_aux=True))
    n = B * (T - 1)
    for count in (0, 1, 2, 3, chunk - 1, chunk, chunk + 1, chunk + 3, 2 * chunk + 5, n - 1, n):
        mask = jnp.asarray(rng.permutation(n) < count).reshape(B, T - 1)
        (_, want_logp), want_g = want_fn(h_BTD, w_DV, mask)
        (_, got_logp), got_g = got_fn(h_BTD, w_DV, mask)
        assert rel_err(got_logp, want_logp) <= 1e-5, count
        for g, w in zip(got_g, want_g, strict=True):
            assert rel_err(g, w) <= 1e-5, count


@pytest.mark.parametrize("ppo", [False, True])
def test_a_batch_with_no_counted_target_gives_zero_loss_and_gradients(ppo):
    model = Transformer(CFG, V, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    batch = random_batch(seed=10)._replace(roles_BT=jnp.full((B, T), roles.CONTEXT, jnp.int32))
    if ppo:
        batch = batch._replace(old_logp_BS=jnp.full((B, T - 1), -1.0))
    cfg = LossConfig(chunk_size=7)

    def fused(p):
        return model_echo_loss(nnx.merge(graphdef, p), batch, cfg)

    (loss, metrics), grads = jax.jit(jax.value_and_grad(fused, has_aux=True))(params)
    assert float(loss) == 0.0 and float(metrics["n_action"]) == 0
    chex.assert_tree_all_finite(grads)
    assert float(optax.tree.norm(grads)) == 0.0


def test_auto_is_chunked_on_cpu_and_explicit_choices_stand():
    assert jax.default_backend() == "cpu"
    assert resolve_impl("auto") == "chunked"
    assert resolve_impl("plain") == "plain" and resolve_impl("chunked") == "chunked"


class OutputProjectionTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matmul_equals_autodiff(self):
        rng = np.random.default_rng(11)
        x = jnp.asarray(rng.normal(size=(13, 7)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(7, 29)), jnp.float32)
        g = jnp.asarray(rng.normal(size=(13, 29)), jnp.float32)

        def loss(mm):
            return jax.value_and_grad(lambda x, w: (mm(x, w) * g).sum(), argnums=(0, 1))

        want = loss(jnp.matmul)(x, w)
        got = self.variant(loss(matmul))(x, w)
        chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
        chex.assert_shape(got[1], [(13, 7), (7, 29)])
