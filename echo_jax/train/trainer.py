"""Training: a pure, jitted `(state, batch) -> (state, metrics)` step and the loop around it."""

from __future__ import annotations

import functools
import math
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from echo_jax.config import Config, ConfigError, LossConfig, TrainConfig, pick, validate
from echo_jax.data import roles
from echo_jax.data.dataset import load_packed
from echo_jax.data.hf_tokenizer import HFVocab
from echo_jax.data.packing import PackedData
from echo_jax.data.vocab import load_vocab
from echo_jax.model.hf_config import read_config
from echo_jax.model.hf_io import load_hf, save_hf
from echo_jax.model.transformer import Transformer
from echo_jax.objective.batch import Batch, batch_rows
from echo_jax.objective.fused_loss import model_loss
from echo_jax.train import distributed
from echo_jax.train.evaluation import Evaluator
from echo_jax.train.run_dir import RunDir
from echo_jax.train.sharding import data_parallel


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimiser updates applied
    params: Any  # pure-dict pytree of the model's parameters
    opt_state: Any


HF_EXPORT = "hf"  # Run subfolder of the trained model in the HF format (cfg.model.hf_path).


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient; the state and checkpoints stay at the last good step."""


def make_optimizer(
    cfg: TrainConfig, schedule: optax.Schedule | float | None = None
) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; the learning rate warms up then decays by cosine over
    cfg.steps unless `schedule` (a schedule or a constant, as the RL loop uses) is given."""
    if schedule is None:
        warmup = min(cfg.warmup_steps, max(cfg.steps - 1, 0))
        schedule = optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=cfg.learning_rate,
            warmup_steps=warmup,
            decay_steps=max(cfg.steps, warmup + 1),
            end_value=0.1 * cfg.learning_rate,
        )
    decay_mask = functools.partial(jax.tree.map, lambda p: p.ndim >= 2)
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=decay_mask),
    )


def init_model(cfg: Config, vocab_size: int, seed: int) -> tuple[nnx.GraphDef, Any]:
    """The model's static graph and its parameters as a pure dict (what optax and orbax see):
    the checkpoint's (cfg.model.hf_path, computing in cfg.model.dtype), else freshly
    initialised from `seed`."""
    if cfg.model.hf_path:
        hf_cfg, graphdef, params = load_hf(cfg.model.hf_path, cfg.model.dtype, cfg.model.attention)
        if hf_cfg.vocab_size != vocab_size:
            raise ConfigError(f"{cfg.model.hf_path}: vocab_size {hf_cfg.vocab_size}, but the "
                              f"run's vocabulary has {vocab_size} ids")  # fmt: skip
        return graphdef, params
    model = Transformer(cfg.model, vocab_size, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def init_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def step_function(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, loss_cfg: LossConfig):
    """The pure `(state, batch) -> (state, metrics)` step behind both jitted forms.

    A non-finite loss or gradient leaves the state unchanged and sets metrics["nonfinite"], so a
    divergence never poisons the parameters that the loop may checkpoint.

    The batch (objective.batch.Batch) carries tokens, roles and advantages, and for on-policy
    updates (echo_jax.rl.update) old log-probs (the PPO-clip surrogate), env and policy weights
    and a per-row λ (which replaces loss_cfg.lam without recompiling).
    """

    def loss_fn(params, batch: Batch):
        return model_loss(nnx.merge(graphdef, params), batch, loss_cfg)

    def step_fn(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = TrainState(state.step + 1, params, opt_state)
        state = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
        counts = jnp.bincount(batch.roles_BT[:, 1:].ravel(), length=roles.NUM_ROLES)
        metrics = dict(metrics, grad_norm=grad_norm, nonfinite=~ok)
        metrics.update({f"targets_{n}": counts[i] for i, n in enumerate(roles.NAMES)})
        return state, metrics

    return step_fn


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, loss_cfg: LossConfig):
    """One optimiser step, jitted once; the incoming state's buffers are donated to the outgoing
    one. See `step_function` for what a batch may carry."""
    return jax.jit(step_function(graphdef, tx, loss_cfg), donate_argnums=0)


def make_train_steps(
    graphdef: nnx.GraphDef, tx: optax.GradientTransformation, loss_cfg: LossConfig
):
    """Several optimiser steps in one jitted call, the state donated:
    `(state, batches, active_K) -> (state, metrics)`, each leaf of batches and metrics stacked
    on a leading K axis, step i reading batch i.

    Why: XLA allocates a call's temporaries afresh on every call, and on a CPU the page faults
    of touching them are a sizeable share of a step; a `lax.scan` over K steps pays them once
    (`TrainConfig.steps_per_call`; benchmarks/train_step_vs_torch measures it, side "jax"
    against "jax_1"). The steps are `make_train_step`'s, so the result is the same as K calls
    of it.

    A step whose `active_K` entry is False, or that comes after a non-finite step, is skipped
    (state untouched, metrics zero): one compiled K serves shorter calls, and a call stops
    where single steps would have.
    """
    step_fn = step_function(graphdef, tx, loss_cfg)

    def steps_fn(state: TrainState, batches: Batch, active_K: jax.Array):
        first = jax.tree.map(lambda x: x[0], batches)
        metrics_shapes = jax.eval_shape(step_fn, state, first)[1]

        def skip(state, _):
            return state, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), metrics_shapes)

        def body(carry, xs):
            state, halted = carry
            batch, active = xs
            state, metrics = jax.lax.cond(active & ~halted, step_fn, skip, state, batch)
            return (state, halted | metrics["nonfinite"]), metrics

        halted = jnp.zeros((), jnp.bool_)
        (state, _), metrics = jax.lax.scan(body, (state, halted), (batches, active_K))
        return state, metrics

    return jax.jit(steps_fn, donate_argnums=0)


def batch_indices(step: int, num_rows: int, batch_size: int, seed: int) -> np.ndarray:
    """Row indices of a step's batch: a fresh permutation per epoch, a pure function of step.

    Being a function of (step, seed) alone is what makes a resumed run see the same batches as
    an uninterrupted one.
    """
    positions = step * batch_size + np.arange(batch_size)
    epochs, offsets = np.divmod(positions, num_rows)
    out = np.empty(batch_size, np.int64)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(num_rows)
        sel = epochs == epoch
        out[sel] = perm[offsets[sel]]
    return out


def make_batch(data: PackedData, index: np.ndarray, advantage: str = "group") -> Batch:
    """Rows `index` ([B], or [K, B] for K steps' batches stacked); the action weights are the
    group advantages or, with advantage="reward" (LossConfig.advantage), the raw rewards."""
    weights = pick("advantage", advantage, {"group": data.advantage, "reward": data.reward})
    return batch_rows(index, data.tokens, data.roles, weights)


class MetricsLog:
    """Per-step host metrics averaged over each logging interval, then reset; each interval's
    means go to metrics.jsonl and to TensorBoard (tagged train/...)."""

    def __init__(self, run: RunDir, tokens_per_step: int):
        self.run = run
        self.tokens_per_step = tokens_per_step
        self.sums: dict[str, float] = {}
        self.count = 0
        self.t0 = time.perf_counter()

    def add(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.count += 1

    def flush(self, step: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        line = {"step": step, **{k: v / self.count for k, v in self.sums.items()}}
        line["steps_per_s"] = self.count / elapsed
        line["tokens_per_s"] = self.count * self.tokens_per_step / elapsed
        self.run.append_metrics(line)
        self.run.scalars.write(step, line, prefix="train/")
        self.sums, self.count, self.t0 = {}, 0, time.perf_counter()
        return line


def _check_finite(step: int, metrics: dict[str, float], run: RunDir) -> None:
    if metrics["nonfinite"] or not math.isfinite(metrics["loss"]):
        last = run.latest_checkpoint_step()
        raise TrainingDiverged(
            f"non-finite {'loss' if not math.isfinite(metrics['loss']) else 'gradient'} at step "
            f"{step} (loss={metrics['loss']}, grad_norm={metrics['grad_norm']}); stopped without "
            f"applying it. Last good checkpoint: "
            f"{'none' if last is None else f'step {last}'} in {run.checkpoint_dir}"
        )


def _progress(line: dict[str, float], total: int) -> str:
    return (
        f"step {line['step']:>5}/{total}  loss {line['loss']:.4f}  pg {line['pg_loss']:+.4f}  "
        f"env_ce {line['env_ce']:.3f}  action_ce {line['action_ce']:.3f}  "
        f"{line['steps_per_s']:.1f} steps/s  {line['tokens_per_s']:.0f} tok/s"
    )


def train(
    cfg: Config,
    data: PackedData,
    vocab_size: int,
    run: RunDir,
    log=print,
    evaluator: Evaluator | None = None,
) -> dict[str, Any]:
    """Trains to cfg.train.steps, resuming from the run's latest checkpoint if there is one.

    `evaluator`, when given, runs on the steps it says are due, before that step's checkpoint.

    Several processes (echo_jax.train.distributed) each call it alike: each builds only its rows of
    every batch, the steps and checkpoints are collective, and every process reads the same
    metrics (so all stop alike on a divergence); only process 0 writes the run's files.
    """
    validate(cfg)
    tcfg = cfg.train
    tx = make_optimizer(tcfg)
    graphdef, params = init_model(cfg, vocab_size, tcfg.seed)
    dp = data_parallel(tcfg.batch_size)  # Rows split over all devices, the state replicated.
    state = jax.device_put(init_state(params, tx), dp.replicated)
    start = run.latest_checkpoint_step() or 0
    if start:
        state, meta = run.restore(state, start)  # Restored into the template's shardings.
        log(f"resumed from step {start} (data position {meta['data_position']})")
    run.truncate_metrics(after_step=start)
    if evaluator is not None:
        evaluator.truncate(after_step=start)
    train_steps = make_train_steps(graphdef, tx, cfg.loss)
    b, t, k = tcfg.batch_size, data.tokens.shape[1], tcfg.steps_per_call
    share = distributed.process_slice(b, dp.steps)  # This process's rows of every batch.
    metrics_log = MetricsLog(run, tokens_per_step=b * t)
    t_start = time.perf_counter()
    last_line: dict[str, float] = {}
    last_eval: dict[str, Any] = {}

    def saves_at(step: int) -> bool:
        return step % tcfg.checkpoint_every == 0 or step == tcfg.steps

    def evaluates_at(step: int) -> bool:
        return evaluator is not None and evaluator.due(step)

    def stops_at(step: int) -> bool:
        """Whether a call must end after `step`: the state is needed there."""
        return saves_at(step) or evaluates_at(step)

    def finish(first: int, n: int, metrics) -> None:
        """Reads a call's n steps' metrics (steps first+1 ... first+n) and logs them."""
        nonlocal last_line
        host = distributed.to_host(metrics)
        for i in range(n):
            step, line = first + i + 1, {key: float(v[i]) for key, v in host.items()}
            _check_finite(step, line, run)
            metrics_log.add(line)
            if step % tcfg.log_every == 0 or step == tcfg.steps:
                last_line = metrics_log.flush(step)
                log(_progress(last_line, tcfg.steps))

    pending = None
    step = start
    while step < tcfg.steps:
        n = next(i for i in range(1, k + 1) if i == k or stops_at(step + i))
        rows = [batch_indices(step + i, data.num_rows, b, tcfg.seed) for i in range(n)]
        rows += rows[-1:] * (k - n)  # Inactive steps' batches: read by nothing.
        batches = make_batch(data, np.stack(rows)[:, share], cfg.loss.advantage)
        batches = distributed.global_batch(batches, dp.steps, b)
        active = np.arange(k) < n
        state, metrics = train_steps(state, batches, active)  # Dispatched before the last read.
        if pending is not None:
            finish(*pending)
        pending, step = (step, n, metrics), step + n
        if stops_at(step):  # Checked (and logged) before anything reads or saves the state.
            finish(*pending)
            pending = None
            if evaluates_at(step):
                last_eval = evaluator(step, graphdef, state.params)
                run.scalars.write(step, last_eval, prefix="eval/")
            if saves_at(step):
                run.save(state, step, {"data_position": step * b, "seed": tcfg.seed})
    wall = time.perf_counter() - t_start
    if cfg.model.hf_path and distributed.is_primary():  # Back out in the checkpoint's format.
        hf_cfg = read_config(cfg.model.hf_path)
        save_hf(os.path.join(run.path, HF_EXPORT), hf_cfg, distributed.to_host(state.params),
                source=cfg.model.hf_path)  # fmt: skip
        log(f"saved the trained model as a checkpoint folder: {run.path}/{HF_EXPORT}")
    summary = {
        "steps": tcfg.steps,
        "resumed_from": start,
        "wall_s": wall,
        "final": last_line,
        "eval": last_eval,
        "params": int(sum(x.size for x in jax.tree.leaves(state.params))),
        "data": data.stats.as_dict(),
    }
    run.write_json("summary.json", summary)
    if last_line:
        log(
            f"done: {tcfg.steps - start} steps in {wall:.1f}s; final loss {last_line['loss']:.4f}, "
            f"env_ce {last_line['env_ce']:.3f} nats/token; workdir {run.path}"
        )
    else:
        log(f"done: the run in {run.path} had already reached step {tcfg.steps}")
    return summary


def _silent(*_args, **_kwargs) -> None:
    pass


def run_experiment(cfg: Config, workdir: str, resume: bool = False, log=print) -> dict[str, Any]:
    """The whole job behind `experiments.train`: claim the workdir, pack the data, train.

    With several processes each runs it alike (after `distributed.initialize`); only process 0
    logs and writes files. Every process evaluates (the jitted evaluation spans all devices);
    process 0 writes eval.jsonl and the TensorBoard scalars (WORKDIR/tensorboard).
    """
    validate(cfg)
    primary = distributed.is_primary()
    if not primary:
        log = _silent
    data_parallel(cfg.train.batch_size)  # A batch the devices cannot split fails here, early.
    run = RunDir.open(workdir, cfg, resume)
    vocab_path = run.file(RunDir.VOCAB)
    if os.path.exists(vocab_path):
        saved_vocab = load_vocab(vocab_path)
    elif cfg.model.hf_path:
        saved_vocab = HFVocab(cfg.model.hf_path)  # The checkpoint's own tokenizer.
    else:
        saved_vocab = None
    data, vocab = load_packed(cfg.data, saved_vocab)
    run.claim()
    if not os.path.exists(vocab_path) and primary:
        vocab.save(vocab_path)
    stats = data.stats.as_dict()
    log(
        f"data: {stats['episodes']} episodes -> {stats['rows']} rows of {cfg.data.max_len} tokens; "
        f"vocab {vocab.size}; kept/dropped per role: "
        + ", ".join(f"{n} {stats[f'kept_{n}']}/{stats[f'dropped_{n}']}" for n in roles.NAMES[1:])
        + f"; straddles {stats['straddles']}"
    )
    evaluator = Evaluator.for_run(cfg, vocab, data, run.path if primary else None, log)
    try:
        return train(cfg, data, vocab.size, run, log, evaluator)
    finally:
        run.close()
