"""The benchmarks' PyTorch reference computes what echo_jax computes (skipped without torch,
a benchmark-only extra), so the speed comparisons compare the same work."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from echo_jax.config import Config, LossConfig, ModelConfig
from echo_jax.objective.loss import echo_loss
from echo_jax.train.trainer import init_model
from tests.test_fused_loss import random_batch

torch = pytest.importorskip("torch")
from benchmarks import torch_reference as tr  # noqa: E402

B, T, V = 3, 17, 61
MODEL = ModelConfig(d_model=16, n_layers=2, n_heads=2, d_ff=32)


def to_torch(x):
    return torch.from_numpy(np.array(x))


def torch_kwargs(cfg: LossConfig) -> dict:
    """The PyTorch reference's keyword options for the same loss."""
    names = ("objective", "lam", "world_loss_target", "world_loss_normalization",
             "pg_loss_reduction", "clip_eps")  # fmt: skip
    return {name: getattr(cfg, name) for name in names}


@pytest.mark.parametrize("use_old", [False, True])
def test_loss_and_logit_gradients_match(use_old):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(B, T, V)).astype(np.float32)
    old = np.log(rng.uniform(0.01, 0.5, (B, T - 1))).astype(np.float32) if use_old else None
    batch = random_batch(seed=1, v=V)._replace(old_logp_BS=old)
    cfg = LossConfig(lam=0.3)

    def jax_loss(x):
        return echo_loss(x, batch, cfg)

    (want, want_m), want_g = jax.value_and_grad(jax_loss, has_aux=True)(logits)
    x = to_torch(logits).requires_grad_(True)
    got, got_m = tr.echo_loss(
        x,
        to_torch(batch.tokens_BT),
        to_torch(batch.roles_BT),
        to_torch(batch.advantages_B),
        old_logp_BT=None if old is None else to_torch(old),
        **torch_kwargs(cfg),
    )
    got.backward()
    np.testing.assert_allclose(got.item(), float(want), rtol=1e-5)
    for key in ("pg_loss", "env_loss", "env_ce", "action_ce", "clip_frac"):
        np.testing.assert_allclose(got_m[key].item(), float(want_m[key]), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(x.grad.numpy(), np.asarray(want_g), rtol=1e-4, atol=1e-7)


def test_model_with_copied_weights_gives_the_same_logits():
    graphdef, params = init_model(Config(model=MODEL), V, 0)
    model = tr.Transformer(MODEL.d_model, MODEL.n_layers, MODEL.n_heads, MODEL.d_ff, V)
    with torch.no_grad():
        model.embed.weight.copy_(to_torch(params["embed"]["embedding"]))
        model.final_norm.scale.copy_(to_torch(params["final_norm"]["scale"]))
        for i, block in enumerate(model.blocks):
            p = params["blocks"][i]
            block.norm1.scale.copy_(to_torch(p["norm1"]["scale"]))
            block.norm2.scale.copy_(to_torch(p["norm2"]["scale"]))
            for layer, (a, b) in {
                block.qkv: ("attn", "qkv"),
                block.out: ("attn", "out"),
                block.up: ("mlp", "up"),
                block.down: ("mlp", "down"),
            }.items():
                layer.weight.copy_(to_torch(p[a][b]["kernel"]).T)
    tokens = random_batch(seed=2, v=V).tokens_BT
    want = nnx.merge(graphdef, params)(jnp.asarray(tokens))
    got = model(to_torch(tokens).long()).detach().numpy()
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-4)
    assert sum(p.numel() for p in model.parameters()) == sum(
        x.size for x in jax.tree.leaves(params)
    )


@pytest.mark.parametrize("world_loss_target", ["env_only", "all"])
def test_skipping_uncounted_targets_changes_neither_loss_nor_gradients(world_loss_target):
    """The benchmark's second PyTorch side (the same target skipping as echo_jax's CPU path)."""
    torch.manual_seed(0)
    model = tr.Transformer(MODEL.d_model, MODEL.n_layers, MODEL.n_heads, MODEL.d_ff, V)
    batch = random_batch(seed=2, v=V)
    tokens, roles, advantages = (to_torch(x) for x in batch[:3])
    tokens = tokens.long()
    kwargs = torch_kwargs(LossConfig(lam=0.3, world_loss_target=world_loss_target))
    out = []
    for skip in (False, True):
        model.zero_grad()
        if skip:
            logp = tr.counted_label_logprobs(
                model.features(tokens), model.output_matrix(), tokens, roles, world_loss_target
            )
        else:
            logp = tr.label_logprobs(model(tokens), tokens)
        loss, metrics = tr.echo_loss_from_logprobs(logp, roles, advantages, **kwargs)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        out.append((loss.item(), metrics["env_ce"].item(), grads))
    (loss0, ce0, g0), (loss1, ce1, g1) = out
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    np.testing.assert_allclose(ce1, ce0, rtol=1e-6)
    for a, b in zip(g1, g0, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)
