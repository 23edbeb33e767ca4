"""The one definition of every run setting; flags, tests and saved runs all build these."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from echo_jax.objective.objectives import objective_spec
from echo_jax.util.choices import ConfigError, pick

WORLD_LOSS_TARGETS: tuple[str, ...] = ("env_only", "all")
WORLD_LOSS_NORMALIZATIONS: tuple[str, ...] = ("full_observation_tokens", "token_mean")
PG_LOSS_REDUCTIONS: tuple[str, ...] = ("sequence_mean", "token_mean")
ADVANTAGES: tuple[str, ...] = ("group", "reward")
OVERFLOW_MODES: tuple[str, ...] = ("window", "truncate")
SPLITS: tuple[str, ...] = ("train", "heldout_tasks", "heldout_scenarios")
DTYPES: tuple[str, ...] = ("float32", "bfloat16")
ATTENTION_IMPLS: tuple[str, ...] = ("auto", "blocked", "xla", "cudnn")
LOSS_IMPLS: tuple[str, ...] = ("auto", "plain", "chunked")
# Held-out evaluation sets: the corpus splits plus the one real AWM capture ("real").
EVAL_SPLITS: tuple[str, ...] = (*SPLITS, "real")

DEFAULT_DATA = ("data/corpus",)  # The shipped corpus; its train split by default.
REAL_EPISODE = "data/awm_e_commerce_33_task0.json"  # The real AWM capture, held out.


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    pick(name, value, dict.fromkeys(allowed))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    d_model: int = 128  # Residual stream width.
    n_layers: int = 2  # Decoder blocks.
    n_heads: int = 2  # Attention heads; d_model must divide evenly. CPU cost grows with heads·T².
    d_ff: int = 512  # Hidden width of each block's MLP.
    dtype: str = "float32"  # Compute dtype of activations ("bfloat16" on accelerators).
    tie_embeddings: bool = True  # Share the input embedding with the output projection.
    # Causal attention backend (echo_jax.model.attention): "cudnn" (jax.nn.dot_product_attention's
    # fused GPU kernel, bf16/fp16 only), "xla" (its portable one), "blocked" (query blocks that
    # skip the masked half; fastest on CPU), or "auto" (cudnn on a GPU in bfloat16, blocked on
    # a CPU, else xla).
    attention: str = "auto"
    # A Hugging Face checkpoint folder (config.json, safetensors, tokenizer.json; Qwen3 or
    # Llama, echo_jax.model.hf) to start from, with its own tokenizer and the chat layout
    # (echo_jax.data.chat); the width, depth and vocabulary fields above are then the
    # checkpoint's. "": the tiny model above, trained from scratch.
    hf_path: str = ""


MODEL_PRESETS: dict[str, ModelConfig] = {
    # The default: small enough to train on 2 CPU cores (benchmarks/train_step_vs_torch times
    # its step).
    "tiny": ModelConfig(),
    # Four times the tiny model's parameters (twice the width).
    "small": ModelConfig(d_model=256, n_layers=2, n_heads=2, d_ff=1024),
    # 100.7M parameters at the default 8192-row vocabulary (94.4M in the blocks + 768·V tied
    # embedding; 171.4M with the full cl100k vocabulary); meant for T=2048 on an accelerator in
    # bfloat16 compute, float32 master weights and loss.
    "gpu100m": ModelConfig(d_model=768, n_layers=12, n_heads=12, d_ff=3584, dtype="bfloat16"),
}


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The loss's options, checked where they are built; the loss takes the object whole (it is
    hashable: a jitted function can take it as a static argument)."""

    # A registered objective (echo_jax.objective.objectives): "grpo" (action term), "echo"
    # (both), "verifier_free" (env CE alone).
    objective: str = "echo"
    lam: float = 0.05  # λ: weight of the env cross-entropy under objective="echo".
    world_loss_target: str = "env_only"  # "env_only" (ENV_OUTPUT) or "all" (+ WARNING).
    world_loss_normalization: str = "full_observation_tokens"  # Or "token_mean".
    pg_loss_reduction: str = "sequence_mean"  # Or "token_mean".
    clip_eps: float = 0.2  # PPO clip range, used when old log-probs are given.
    # The action term's weights: "group" (GRPO's group-relative advantage) or "reward" (the
    # episode's raw reward, no baseline: rewarded episodes' calls are imitated and the rest
    # ignored, a behaviour-cloning warm start for the on-policy loop).
    advantage: str = "group"
    # "plain": logits [B, T, V] then the loss; "chunked": output projection fused with the
    # cross-entropy over chunks of target tokens, never building [B, T, V] (large vocabularies)
    # and skipping the targets nothing reads (CONTEXT, PAD); "auto": chunked on a CPU, where
    # that skipping makes it the faster one, plain elsewhere
    # (echo_jax.objective.fused_loss.resolve_impl).
    impl: str = "auto"
    # Target tokens per chunk of impl="chunked": temporaries of a few [chunk, V] float32 blocks
    # (205 MB each at 512 x 100,277).
    chunk_size: int = 512

    def __post_init__(self) -> None:
        objective_spec(self.objective)
        _choice("world_loss_target", self.world_loss_target, WORLD_LOSS_TARGETS)
        _choice(
            "world_loss_normalization", self.world_loss_normalization, WORLD_LOSS_NORMALIZATIONS
        )
        _choice("pg_loss_reduction", self.pg_loss_reduction, PG_LOSS_REDUCTIONS)
        _choice("advantage", self.advantage, ADVANTAGES)
        _choice("loss impl", self.impl, LOSS_IMPLS)
        for ok, message in (
            (self.lam >= 0, f"lam must be >= 0, got {self.lam}"),
            (0 < self.clip_eps < 1, f"clip_eps must be in (0, 1), got {self.clip_eps}"),
            (self.chunk_size >= 1, f"chunk_size must be >= 1, got {self.chunk_size}"),
        ):
            if not ok:
                raise ConfigError(message)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    paths: tuple[str, ...] = DEFAULT_DATA  # Episode files, globs or corpus folders.
    split: str = "train"  # Which split of a corpus folder to use; plain files are used whole.
    max_len: int = 1024  # T: tokens per row.
    overflow: str = "window"  # Longer episodes: "window" (restart with CONTEXT) or "truncate".
    # Cap on the compact vocabulary, PAD and the 256 byte tokens included; 0: the full cl100k
    # vocabulary (PAD + all 100,277 cl100k ids), for use with LossConfig.impl="chunked".
    vocab_size: int = 8192
    vocab_min_count: int = 1  # A cl100k token needs this many training occurrences to get a row.
    canonical_json: bool = False  # Re-serialise tool results as sorted, compact JSON.
    # Skip invalid or duplicate episodes (reported, grouped by reason) instead of failing.
    skip_invalid: bool = False
    # Folder caching packed arrays by a hash of inputs, settings and pipeline code ("": no
    # cache; the CLI's --cache_dir defaults to ~/.cache/echo_jax).
    cache_dir: str = ""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 60  # Optimiser steps (the default run must finish in < 3 min on 2 CPU cores).
    batch_size: int = 4  # Rows per step (B).
    learning_rate: float = 3e-3  # Peak AdamW learning rate.
    warmup_steps: int = 10  # Linear warm-up, then cosine decay to 10% of the peak.
    weight_decay: float = 0.01  # AdamW decoupled weight decay.
    grad_clip: float = 1.0  # Global gradient-norm clip.
    seed: int = 0  # Parameter init and data order.
    log_every: int = 10  # Steps between metrics lines (means over the interval).
    checkpoint_every: int = 30  # Steps between checkpoints; the last step is always saved.
    keep_checkpoints: int = 2  # Checkpoints kept on disk.
    # Optimiser steps per jitted call (a scan over that many batches, train.make_train_steps):
    # XLA's temporaries are then allocated once per call rather than per step, a visible share
    # of a CPU step (benchmarks/train_step_vs_torch: side "jax" against "jax_1"). Checkpoints
    # and evaluations end a call early; any value gives the same training.
    steps_per_call: int = 4


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    every: int = 0  # Steps between held-out evaluations; 0: only after the last step.
    splits: tuple[str, ...] = EVAL_SPLITS  # Sets evaluated (EVAL_SPLITS); empty: no evaluation.
    max_rows: int = 32  # Rows per set, a fixed subsample when there are more; keeps eval cheap.
    batch_size: int = 4  # Rows per jitted eval call (the last call is padded).
    real_path: str = REAL_EPISODE  # The real AWM capture evaluated as set "real".
    success_reward: float = 1.0  # Action metrics use episodes with reward >= this (verified).


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    """How the closed-loop agent samples its calls (echo_jax.agent); not part of a run's Config."""

    temperature: float = 1.0  # Sampling temperature of pass@k samples; 0 is greedy.
    top_p: float = 1.0  # Nucleus sampling: smallest token set with this much probability.
    max_new_tokens: int = 256  # Tokens per call before it counts as unclosed (a format error).
    max_steps: int = 30  # Tool calls before the harness forces verify (HarnessConfig).
    slots: int = 16  # Episodes in flight in the rollout engine (one KV-cache row each).
    servers_per_scenario: int = 1  # World servers per scenario (each serves one episode).


LAM_SCHEDULES: tuple[str, ...] = ("constant", "linear", "step")


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """The on-policy loop (echo_jax.rl.loop); its loss is Config.loss, its model the start's."""

    iterations: int = 16  # Rounds of rollouts then updates; every round revisits the pool.
    group_size: int = 8  # G: rollouts per pool task; advantages are relative within each group.
    # The task pool, chosen once from the start checkpoint (rl.choose_pool): pool_probe
    # rollouts of each of pool_candidates training tasks (a seeded draw), keeping those whose
    # success rate lies in [pool_min_success, pool_max_success], at most pool_size of them.
    pool_size: int = 4
    pool_candidates: int = 16
    pool_probe: int = 8
    pool_min_success: float = 0.1
    pool_max_success: float = 0.7
    pool_seed: int = 0  # The candidates' draw and the probes' sampling (the same for all arms).
    pool_file: str = ""  # A pool.json written earlier (rl_sweep shares one); "": choose here.
    # A task_difficulty.json (experiments.rl --probe_only): the pool is then pool_zero tasks of
    # its "zero" band (never solved at the start, solved by a scripted policy) and pool_low of
    # its "low" band, spread over templates and domains, instead of probing candidates.
    pool_difficulty: str = ""
    pool_zero: int = 4
    pool_low: int = 2
    # Sampling of the rollouts. The PPO ratio needs the sampler's own distribution, which is the
    # model's softmax only at temperature 1 and top_p 1; other values are refused.
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128  # Tokens per generated call before it counts as unclosed.
    max_steps: int = 8  # Tool calls per rollout before the harness forces verify.
    epochs: int = 2  # Passes over an iteration's rows, each in a fresh order.
    minibatch_size: int = 16  # Rows per update step; the last minibatch is padded with empty rows.
    learning_rate: float = 3e-4  # Constant AdamW learning rate (clip and decay from TrainConfig).
    # λ at each iteration: "constant" (loss.lam), "linear" (loss.lam to lam_final at the last
    # iteration), "step" (loss.lam times lam_decay every lam_step_every iterations).
    lam_schedule: str = "constant"
    lam_final: float = 0.0  # λ at the last iteration of the "linear" schedule.
    lam_decay: float = 0.5  # Factor of the "step" schedule.
    lam_step_every: int = 2  # Iterations between the "step" schedule's decays.
    # Env-term filters: a rollout pays the env term only if at least this share of its steps
    # were tool calls the world accepted (reward_type tool_call_ok, verify counted as valid) ...
    min_valid_call_share: float = 0.0
    min_parse_share: float = 0.0  # ... and at least this share of its generated calls parsed.
    # Groups whose rewards are all equal have no policy term; their observations still train
    # the world model unless this drops them from the env term too.
    drop_equal_reward_groups: bool = False
    # Env-term weight of each kind of observation token (1 is the plain env term; WARNING
    # tokens count only under loss.world_loss_target="all").
    weight_tool_result: float = 1.0
    weight_tool_error: float = 1.0
    weight_verifier: float = 1.0
    weight_warning: float = 1.0
    # Training reward: the verifier's (AWM's table) minus this times the share of the rollout's
    # steps that were format errors (AWM scores each -1.0; 0 keeps the verifier's alone).
    format_penalty: float = 0.0
    # A minibatch through which the loss has no gradient (every advantage 0 under grpo, no env
    # target weighted) makes no optimiser step: AdamW's momentum and weight decay would still
    # move the parameters on a zero gradient.
    skip_empty_updates: bool = True
    # Each iteration, at the sampling parameters on its rows: |∇L_pg|, |∇(λ·L_env)|, |∇L_env|
    # and their cosine (grad_norm_pg, grad_norm_env, grad_norm_env_unscaled, grad_cos); costs
    # about one more pass over the rows.
    measure_gradients: bool = True
    slots: int = 16  # Rollouts in flight in the rollout engine.
    servers_per_scenario: int = 4  # World servers per scenario, kept across iterations.
    split: str = "train"  # Corpus split whose tasks are pool candidates.
    eval_every: int = 4  # Iterations between greedy pass@1 runs on the pool and held out.
    eval_split: str = "heldout_tasks"  # Split of the held-out pass@1 runs ("": none).
    eval_max_tasks: int = 8  # Fixed random subset of its tasks (0: all).
    eval_seed: int = 0  # The subset's draw: one fixed set for every seed and arm.
    # Rows per corpus split (heldout_tasks, heldout_scenarios) of the teacher-forced env and
    # action CE at the start and the end (a fixed subsample; 0: none).
    heldout_ce_rows: int = 64
    seed: int = 0  # Sampling keys and minibatch order.


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        data = dict(d["data"])
        data["paths"] = tuple(data["paths"])
        return cls(
            model=ModelConfig(**d["model"]),
            loss=LossConfig(**d["loss"]),
            data=DataConfig(**data),
            train=TrainConfig(**d["train"]),
            eval=EvalConfig(**_with_tuples(d.get("eval", {}), "splits")),  # Older runs: none.
        )


def _with_tuples(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: tuple(v) if k in keys else v for k, v in d.items()}


def validate(cfg: Config) -> Config:
    """Rejects bad values before any work starts; returns cfg for chaining. (LossConfig checks
    its own fields when it is built.)"""
    data, train, model, ev = cfg.data, cfg.train, cfg.model, cfg.eval
    _choice("overflow", data.overflow, OVERFLOW_MODES)
    _choice("split", data.split, SPLITS)
    _choice("dtype", model.dtype, DTYPES)
    _choice("attention", model.attention, ATTENTION_IMPLS)
    for split in ev.splits:
        _choice("eval split", split, EVAL_SPLITS)
    checks = [
        (len(data.paths) > 0, "no data paths given"),
        (data.max_len >= 8, f"max_len must be >= 8, got {data.max_len}"),
        (
            data.vocab_size == 0 or data.vocab_size >= 258,
            f"vocab_size must be 0 (full cl100k) or >= 258 (PAD + 256 bytes + 1), "
            f"got {data.vocab_size}",
        ),
        (data.vocab_min_count >= 1, "vocab_min_count must be >= 1"),
        (train.steps >= 1, f"steps must be >= 1, got {train.steps}"),
        (train.batch_size >= 1, f"batch_size must be >= 1, got {train.batch_size}"),
        (train.learning_rate > 0, f"learning_rate must be > 0, got {train.learning_rate}"),
        (train.warmup_steps >= 0, "warmup_steps must be >= 0"),
        (train.log_every >= 1, "log_every must be >= 1"),
        (train.checkpoint_every >= 1, "checkpoint_every must be >= 1"),
        (
            train.checkpoint_every % train.log_every == 0,
            "checkpoint_every must be a multiple of log_every (a resumed run then starts on a "
            "logging interval's boundary and logs exactly what an uninterrupted one would)",
        ),
        (train.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
        (train.steps_per_call >= 1, f"steps_per_call must be >= 1, got {train.steps_per_call}"),
        (
            model.d_model % model.n_heads == 0,
            f"d_model={model.d_model} is not divisible by n_heads={model.n_heads}",
        ),
        (
            (model.d_model // model.n_heads) % 2 == 0,
            "head dimension d_model/n_heads must be even (rotary embeddings)",
        ),
        (model.n_layers >= 1 and model.d_ff >= 1, "n_layers and d_ff must be >= 1"),
        (ev.every >= 0, f"eval every must be >= 0, got {ev.every}"),
        (ev.max_rows >= 1, f"eval max_rows must be >= 1, got {ev.max_rows}"),
        (ev.batch_size >= 1, f"eval batch_size must be >= 1, got {ev.batch_size}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    return cfg


def validate_rl(rl: RLConfig) -> RLConfig:
    """Rejects RL settings that cannot make a meaningful run; returns rl for chaining."""
    _choice("lam_schedule", rl.lam_schedule, LAM_SCHEDULES)
    _choice("split", rl.split, SPLITS)
    if rl.eval_split:
        _choice("eval_split", rl.eval_split, SPLITS)
    checks = [
        (rl.iterations >= 1, f"iterations must be >= 1, got {rl.iterations}"),
        (
            rl.group_size >= 2,
            f"group_size must be >= 2 (advantages compare within a group), got {rl.group_size}",
        ),
        (rl.pool_size >= 1 and rl.pool_candidates >= 1, "pool_size, pool_candidates >= 1"),
        (rl.pool_probe >= 2, f"pool_probe must be >= 2, got {rl.pool_probe}"),
        (
            0 <= rl.pool_min_success <= rl.pool_max_success <= 1,
            "need 0 <= pool_min_success <= pool_max_success <= 1",
        ),
        (
            rl.temperature == 1.0 and rl.top_p == 1.0,
            f"temperature={rl.temperature}, top_p={rl.top_p}: the PPO update's old log-probs "
            "are the model's softmax, which is the sampling distribution only at temperature 1 "
            "and top_p 1; use those",
        ),
        (rl.max_new_tokens >= 1 and rl.max_steps >= 0, "max_new_tokens >= 1, max_steps >= 0"),
        (rl.epochs >= 1 and rl.minibatch_size >= 1, "epochs and minibatch_size must be >= 1"),
        (rl.learning_rate > 0, f"learning_rate must be > 0, got {rl.learning_rate}"),
        (rl.lam_final >= 0 and rl.lam_decay >= 0, "lam_final and lam_decay must be >= 0"),
        (rl.lam_step_every >= 1, "lam_step_every must be >= 1"),
        (0 <= rl.min_valid_call_share <= 1, "min_valid_call_share must be in [0, 1]"),
        (0 <= rl.min_parse_share <= 1, "min_parse_share must be in [0, 1]"),
        (
            min(rl.weight_tool_result, rl.weight_tool_error, rl.weight_verifier, rl.weight_warning)
            >= 0,
            "observation weights must be >= 0",
        ),  # fmt: skip
        (rl.format_penalty >= 0, "format_penalty must be >= 0"),
        (rl.slots >= 1 and rl.servers_per_scenario >= 1, "slots, servers_per_scenario >= 1"),
        (rl.eval_every >= 0 and rl.eval_max_tasks >= 0, "eval_every, eval_max_tasks >= 0"),
        (
            rl.pool_zero >= 0 and rl.pool_low >= 0 and rl.pool_zero + rl.pool_low >= 1,
            "pool_zero, pool_low >= 0, and at least one task",
        ),
        (rl.heldout_ce_rows >= 0, "heldout_ce_rows >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    return rl
