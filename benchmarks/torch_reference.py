"""PyTorch eager references with the same semantics as echo_jax, for benchmarks only.

`echo_loss` mirrors `echo_jax.objective.loss.echo_loss` (all options), `Transformer` mirrors
`echo_jax.model.transformer.Transformer` (rotary, pre-RMSNorm, causal SDPA, tanh-GELU MLP, tied
embedding
scaled by d^-1/2, the same initialisers), and `TrainStep` mirrors `echo_jax.train.trainer`'s step
(global-norm clip, AdamW with decay on matrices only, warm-up + cosine schedule).
torch is a benchmark-only extra; nothing in echo_jax imports this.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

PAD, CONTEXT, ACTION, ENV_OUTPUT, WARNING = range(5)
FULL_OBS_EPS = 1e-3


def label_logprobs(logits_BTV: torch.Tensor, tokens_BT: torch.Tensor) -> torch.Tensor:
    """log p(tokens[:, t+1]) via log_softmax + gather: on CPU eager ~1.4x faster than the
    label-logit - logsumexp form (same values), so the faster one is the baseline."""
    logp_BSV = torch.log_softmax(logits_BTV[:, :-1].float(), dim=-1)
    return logp_BSV.gather(-1, tokens_BT[:, 1:].long().unsqueeze(-1)).squeeze(-1)


def _safe_div(num, den):
    return num / torch.clamp(den, min=1.0)


def counted_targets(target_roles_BS, world_loss_target="env_only"):
    """The targets the loss or its metrics read (echo_jax.objective.loss.counted_targets)."""
    counted_BS = (target_roles_BS == ACTION) | (target_roles_BS == ENV_OUTPUT)
    if world_loss_target == "all":
        counted_BS = counted_BS | (target_roles_BS == WARNING)
    return counted_BS


def counted_label_logprobs(h_BTD, w_DV, tokens_BT, roles_BT, world_loss_target="env_only"):
    """`label_logprobs(h @ w, tokens)` at the counted targets only, 0 elsewhere: the projection
    and log-softmax of just those rows, as eager PyTorch would skip them (boolean indexing)."""
    counted_BS = counted_targets(roles_BT[:, 1:], world_loss_target)
    logits_MV = h_BTD[:, :-1][counted_BS] @ w_DV
    labels_M = tokens_BT[:, 1:][counted_BS].long()
    logp_M = torch.log_softmax(logits_MV.float(), dim=-1).gather(-1, labels_M[:, None])[:, 0]
    logp_BS = torch.zeros(counted_BS.shape, dtype=logp_M.dtype)
    return logp_BS.index_put((counted_BS,), logp_M)


def echo_loss(
    logits_BTV,
    tokens_BT,
    roles_BT,
    advantages_B,
    **kwargs,
):
    return echo_loss_from_logprobs(
        label_logprobs(logits_BTV, tokens_BT), roles_BT, advantages_B, **kwargs
    )


def echo_loss_from_logprobs(
    logp_BS,
    roles_BT,
    advantages_B,
    *,
    objective="echo",
    lam=0.05,
    world_loss_target="env_only",
    world_loss_normalization="full_observation_tokens",
    pg_loss_reduction="sequence_mean",
    old_logp_BT=None,
    clip_eps=0.2,
    env_weight_B=None,
):
    target_BS = roles_BT[:, 1:]
    action_BS = (target_BS == ACTION).float()
    env_BS = (target_BS == ENV_OUTPUT).float()
    observation_BS = env_BS + (target_BS == WARNING).float()
    selected_BS = observation_BS if world_loss_target == "all" else env_BS
    if env_weight_B is not None:
        selected_BS = selected_BS * env_weight_B.float()[:, None]

    adv_B1 = advantages_B.float()[:, None]
    if old_logp_BT is None:
        pg_BS = -adv_B1 * logp_BS
        clipped_BS = torch.zeros_like(logp_BS)
    else:
        ratio_BS = torch.exp(logp_BS - old_logp_BT.float())
        clipped_ratio_BS = torch.clamp(ratio_BS, 1.0 - clip_eps, 1.0 + clip_eps)
        pg_BS = -torch.minimum(ratio_BS * adv_B1, clipped_ratio_BS * adv_B1)
        clipped_BS = ((ratio_BS - 1.0).abs() > clip_eps).float()
    n_action_B = action_BS.sum(1)
    n_action = n_action_B.sum()
    if pg_loss_reduction == "sequence_mean":
        row_mean_B = _safe_div((pg_BS * action_BS).sum(1), n_action_B)
        has_action_B = (n_action_B > 0).float()
        pg_loss = _safe_div((row_mean_B * has_action_B).sum(), has_action_B.sum())
    else:
        pg_loss = _safe_div((pg_BS * action_BS).sum(), n_action)

    ce_BS = -logp_BS
    selected_ce_B = (ce_BS * selected_BS).sum(1)
    n_selected = selected_BS.sum()
    if world_loss_normalization == "full_observation_tokens":
        n_obs_B = observation_BS.sum(1)
        has_obs_B = (n_obs_B > 0).float()
        if env_weight_B is not None:
            has_obs_B = has_obs_B * (env_weight_B > 0).float()
        env_loss = _safe_div(
            (selected_ce_B / (n_obs_B + FULL_OBS_EPS) * has_obs_B).sum(), has_obs_B.sum()
        )
    else:
        env_loss = _safe_div(selected_ce_B.sum(), n_selected)

    loss = {"grpo": pg_loss, "echo": pg_loss + lam * env_loss, "verifier_free": env_loss}[objective]
    with torch.no_grad():
        metrics = {
            "loss": loss.detach(),
            "pg_loss": pg_loss.detach(),
            "env_loss": env_loss.detach(),
            "env_ce": _safe_div(selected_ce_B.sum(), n_selected),
            "action_ce": _safe_div((ce_BS * action_BS).sum(), n_action),
            "clip_frac": _safe_div((clipped_BS * action_BS).sum(), n_action),
        }
    return loss, metrics


def rotary(x_BTNH: torch.Tensor, positions_T: torch.Tensor) -> torch.Tensor:
    half = x_BTNH.shape[-1] // 2
    freq_H = 1.0 / (10_000.0 ** (torch.arange(half, dtype=torch.float32) / half))
    angle_TH = positions_T[:, None].float() * freq_H[None, :]
    sin, cos = angle_TH.sin()[None, :, None, :], angle_TH.cos()[None, :, None, :]
    x1, x2 = x_BTNH.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x_BTNH.dtype)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.scale


def _linear(d_in: int, d_out: int, std: float) -> nn.Linear:
    layer = nn.Linear(d_in, d_out, bias=False)
    nn.init.normal_(layer.weight, std=std)
    return layer


class Block(nn.Module):
    def __init__(self, d_model, n_heads, d_ff, n_layers):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.norm1, self.norm2 = RMSNorm(d_model), RMSNorm(d_model)
        self.qkv = _linear(d_model, 3 * d_model, d_model**-0.5)
        self.out = _linear(d_model, d_model, (d_model * 2 * n_layers) ** -0.5)
        self.up = _linear(d_model, d_ff, d_model**-0.5)
        self.down = _linear(d_ff, d_model, (d_ff * 2 * n_layers) ** -0.5)

    def attention(self, x_BTD, positions_T):
        b, t, _ = x_BTD.shape
        qkv = self.qkv(x_BTD).view(b, t, 3, self.n_heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k = rotary(q, positions_T), rotary(k, positions_T)
        y_BNTH = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return self.out(y_BNTH.transpose(1, 2).reshape(b, t, -1))

    def forward(self, x_BTD, positions_T):
        x_BTD = x_BTD + self.attention(self.norm1(x_BTD), positions_T)
        return x_BTD + self.down(F.gelu(self.up(self.norm2(x_BTD)), approximate="tanh"))


class Transformer(nn.Module):
    def __init__(self, d_model, n_layers, n_heads, d_ff, vocab_size):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embed.weight, std=1.0)
        self.blocks = nn.ModuleList(
            [Block(d_model, n_heads, d_ff, n_layers) for _ in range(n_layers)]
        )
        self.final_norm = RMSNorm(d_model)
        self.out_scale = d_model**-0.5

    def features(self, tokens_BT):
        x_BTD = self.embed(tokens_BT)
        positions_T = torch.arange(tokens_BT.shape[1])
        for block in self.blocks:
            x_BTD = block(x_BTD, positions_T)
        return self.final_norm(x_BTD)

    def output_matrix(self):
        return self.embed.weight.T * self.out_scale

    def forward(self, tokens_BT):
        return self.features(tokens_BT) @ self.output_matrix()


def lr_at(step, peak, warmup, total):
    """optax.warmup_cosine_decay_schedule(0, peak, warmup, total, 0.1 * peak)."""
    if step < warmup:
        return peak * step / max(warmup, 1)
    frac = min((step - warmup) / max(total - warmup, 1), 1.0)
    return 0.1 * peak + 0.9 * peak * 0.5 * (1 + math.cos(math.pi * frac))


class TrainStep:
    """Forward, echo loss, backward, global-norm clip, AdamW; like echo_jax.train.trainer's step.

    With skip_uncounted, the output projection and log-softmax run on the counted targets
    only (`counted_label_logprobs`), as echo_jax's default CPU loss path does.
    """

    def __init__(
        self,
        model: Transformer,
        loss_kwargs: dict,
        lr=3e-3,
        wd=0.01,
        clip=1.0,
        warmup=10,
        total=100,
        skip_uncounted=False,
    ):
        self.model, self.loss_kwargs, self.clip = model, loss_kwargs, clip
        self.skip_uncounted = skip_uncounted
        self.schedule = (lr, warmup, total)
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
            lr=lr,
            betas=(0.9, 0.999),
            eps=1e-8,
        )
        self.step = 0

    def __call__(self, batch):
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, *self.schedule)
        self.opt.zero_grad(set_to_none=True)
        tokens, roles = batch["tokens"], batch["roles"]
        if self.skip_uncounted:
            target = self.loss_kwargs.get("world_loss_target", "env_only")
            h = self.model.features(tokens)
            logp = counted_label_logprobs(h, self.model.output_matrix(), tokens, roles, target)
        else:
            logp = label_logprobs(self.model(tokens), tokens)
        loss, metrics = echo_loss_from_logprobs(logp, roles, batch["advantage"], **self.loss_kwargs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.step += 1
        return metrics
