"""On-policy GRPO / ECHO in the local AWM worlds, trained on exactly the tokens it sampled.

`run_rl` is a loop over named steps:
  0. `choose_pool`: once, from the start checkpoint, the training tasks whose success rate lies
     in a band where groups carry signal; every iteration revisits the whole pool.
  1. `RolloutEngine.run`: G rollouts of each pool task with the current policy. Each rollout
     comes with its token-exact rows (`echo_jax.agent.rollout`): the tokens the sampler consumed and
     produced, and the log-probability it sampled each action token with.
  2. `rollout_batch`: those rows as fixed [N, T] arrays; group-relative advantages of the
     training reward; each row's weight in the policy term (an episode counts once however many
     rows it spans); per-target env-term weights (filters, observation kinds).
  3. `score_rows` at the sampling parameters: the gap between the recorded log-probs and the
     update's forward pass (`logp_gap_*`, the check that the update sees what the sampler saw)
     and the env CE of fresh rollouts; `term_gradients`, how hard each term pulls and in which
     direction (`grad_norm_pg`, `grad_norm_env`, `grad_cos`).
  4. `update`: `epochs` passes of minibatch PPO-clip steps of `echo_loss`, old log-probs the
     recorded ones (a minibatch without gradient makes no step); then the KL to the sampling
     policy on the sampled tokens, a checkpoint, per-task and per-band success, and at the
     start, the end and every `eval_every` iterations greedy pass@1 on the pool and on one fixed
     held-out set (at the start and the end also teacher-forced held-out CE).

Workdir: config.json and vocab.json (so `experiments.evaluate` reads an RL run like any
other), rl_config.json, pool.json, metrics.jsonl (one line per iteration; the same scalars in
tensorboard/), rollouts/iter_NNNN.jsonl.gz (capture format with each step's policy record and
the rows), checkpoints/<iteration>, summary.json.

As N processes (`echo_jax.rl.processes`): each runs its share of every set of rollouts, all
get every record, the update and scoring split each minibatch over all processes' devices, and
process 0 alone writes the workdir's files (checkpoints are saved by all together).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optax
from flax import nnx

from echo_jax.agent.closed_loop import SUCCESS, choose_tasks, mute_fork_warning, split_tasks
from echo_jax.agent.policy import load_run
from echo_jax.agent.rollout import EngineConfig, RolloutEngine
from echo_jax.awm.capture_shards import write_shard
from echo_jax.awm.rewards import FORMAT_ERROR_TYPES
from echo_jax.awm.world_format import load_worlds
from echo_jax.config import Config, ConfigError, RLConfig, validate, validate_rl
from echo_jax.data import roles
from echo_jax.data.vocab import Vocab
from echo_jax.rl.pool import (
    choose_pool,
    greedy_pass,
    group_requests,
    pool_by_band,
    read_pool,
    success_rate,
)
from echo_jax.rl.processes import SharedEngine
from echo_jax.rl.resume import check_same_settings, resume_point, rl_settings, update_rng
from echo_jax.rl.rows import RolloutBatch, rollout_batch, rollout_stats
from echo_jax.rl.update import (
    approx_kl,
    logp_gap,
    make_score_fn,
    make_term_gradients_fn,
    role_ce,
    score_rows,
    term_gradients,
    update,
)
from echo_jax.train import distributed
from echo_jax.train.evaluation import Evaluator
from echo_jax.train.run_dir import RunDir
from echo_jax.train.sharding import DataParallel, data_parallel
from echo_jax.train.trainer import init_model, init_state, make_optimizer, make_train_step

ROLLOUT_TIMES = ("decode_s", "extend_s", "wait_s", "tool_s", "verify_s")  # Logged as rollout_*.
# The metrics that are wall-clock times or rates: they differ between runs of the same loop.
TIMING_METRICS = ("rollout_s", "update_s", "decode_tokens_per_s", "env_steps_per_s",
                  *(f"rollout_{k}" for k in ROLLOUT_TIMES))  # fmt: skip
RL_CONFIG = "rl_config.json"
POOL = "pool.json"
ROLLOUT_DIR = "rollouts"
SUMMARY = "summary.json"


def lam_at(rl: RLConfig, lam: float, iteration: int) -> float:
    """λ of iteration (0-based) under rl.lam_schedule, starting from loss.lam."""
    if rl.lam_schedule == "constant":
        return lam
    if rl.lam_schedule == "linear":
        frac = iteration / max(rl.iterations - 1, 1)
        return lam + (rl.lam_final - lam) * frac
    if rl.lam_schedule == "step":
        return lam * rl.lam_decay ** (iteration // rl.lam_step_every)
    raise ConfigError(f"lam_schedule={rl.lam_schedule!r} is unknown")


def start_run(
    workdir: str, start: str | None, cfg: Config | None, rl: RLConfig, dp: DataParallel,
    resume: bool = False, max_len: int | None = None,
) -> tuple[Config, Vocab, nnx.GraphDef, Any, RunDir]:  # fmt: skip
    """Claims the workdir (with `resume`, one of the same run may be there); the model and
    vocabulary come from `start` (a training run's workdir or a checkpoint folder; its
    parameters restored replicated over dp's devices) or, with start=None, from `cfg` and a
    vocabulary built from its data. `max_len`, if given, replaces the start's."""
    if start:
        start_cfg, vocab, graphdef, params, _ = load_run(start, sharding=dp.replicated)
        cfg = dataclasses.replace(start_cfg, loss=cfg.loss) if cfg else start_cfg
    elif cfg is None:
        raise ValueError("from scratch (no start checkpoint) needs a Config")
    if max_len is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_len=max_len))
    if not start:
        from echo_jax.data.dataset import load_packed

        _, vocab = load_packed(cfg.data)
        graphdef, params = init_model(cfg, vocab.size, rl.seed)
    validate(cfg)
    run = RunDir.open(workdir, cfg, resume=resume)
    check_same_settings(run.file(RL_CONFIG), rl, start)
    run.claim()
    if distributed.is_primary():
        vocab.save(run.file(RunDir.VOCAB))
    run.write_json(RL_CONFIG, rl_settings(rl, start))
    return cfg, vocab, graphdef, params, run


def run_rl(
    workdir: str,
    rl: RLConfig,
    *,
    start: str | None = None,
    cfg: Config | None = None,
    worlds: str = "data/awm_worlds",
    corpus_dir: str | None = "data/corpus",
    scenarios: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
    resume: bool = False,
    max_len: int | None = None,
) -> dict[str, Any]:
    """The whole on-policy run; returns its summary (also in WORKDIR/summary.json).

    start   a training run's workdir to start from (its model, vocabulary and data settings;
            `cfg`, if given, supplies the loss), or None to start from scratch with `cfg`.
    resume  continue the run in `workdir` from its last finished iteration, if any
            (`echo_jax.rl.resume`): the same settings, samples and updates as uninterrupted.
    max_len tokens per row and cache row, in place of the start's (long tool lists).

    Several processes (after `distributed.initialize`) each call it alike, with one workdir;
    only process 0 logs and writes files.
    """
    validate_rl(rl)
    if cfg is not None and cfg.loss.advantage != "group":
        raise ConfigError("on-policy updates use group advantages: set loss.advantage='group'")
    mute_fork_warning()
    primary = distributed.is_primary()
    if not primary:
        log = _silent
    dp = data_parallel(rl.minibatch_size)  # A minibatch the devices cannot split fails here.
    if resume and os.path.exists(os.path.join(workdir, SUMMARY)):
        with open(os.path.join(workdir, SUMMARY)) as f:
            log(f"{workdir} is finished; nothing to resume")
            return json.load(f)
    cfg, vocab, graphdef, params, run = start_run(workdir, start, cfg, rl, dp, resume, max_len)
    loaded = load_worlds(worlds, scenarios)
    tx = make_optimizer(cfg.train, schedule=optax.constant_schedule(rl.learning_rate))
    state = distributed.replicate(init_state(params, tx), dp.replicated)
    train_step = make_train_step(graphdef, tx, cfg.loss)
    score = make_score_fn(graphdef, cfg.loss.impl, cfg.loss.chunk_size)
    grad_fns = make_term_gradients_fn(graphdef, cfg.loss)
    max_len = cfg.data.max_len
    rollout_dir = Path(run.path) / ROLLOUT_DIR
    if primary:
        rollout_dir.mkdir(exist_ok=True)
    local = RolloutEngine(graphdef, distributed.local_replica(state.params), vocab, max_len,
                          loaded, EngineConfig.of(rl), cfg.data.canonical_json)  # fmt: skip
    with local:
        engine = SharedEngine(local)
        resumed = resume_point(run, state) if resume else None
        if resumed:  # The pool and held-out set this run chose when it started.
            with open(run.file(POOL)) as f:
                pool = json.load(f)
            held = [tuple(t) for t in pool.pop("heldout")]
        else:
            pool = task_pool(engine, loaded, corpus_dir, rl, start)
            held = heldout_tasks(loaded, corpus_dir, rl)
            run.write_json(POOL, pool | {"heldout": [list(t) for t in held]})
        tasks = [tuple(x) for x in pool["tasks"]]
        bands = pool.get("bands", {})
        teacher = heldout_ce(cfg, vocab, corpus_dir, rl, log)
        started = time.perf_counter()
        if resumed:
            state, env_steps, lines = resumed.state, resumed.env_steps, resumed.lines
            engine.set_params(state.params)
            started -= resumed.wall_s
            log(f"resumed after iteration {resumed.iteration} of {rl.iterations}")
        else:
            env_steps = 0
            lines = [{"iteration": 0, "env_steps": 0, "pool_tasks": len(tasks),
                      **evaluations(engine, tasks, held, 0, rl),
                      **teacher(graphdef, state.params)}]  # fmt: skip
            run.append_metrics(lines[0])  # Before the checkpoint: a saved iteration has a line.
            run.scalars.write(0, lines[0])
            run.save(state, 0, {"iteration": 0, "env_steps": 0, "wall_s": 0.0})
        for it in range(lines[-1]["iteration"] + 1, rl.iterations + 1):
            t0 = time.perf_counter()
            records = engine.run(group_requests(tasks, it, rl.seed, rl.group_size, 1.0))
            if primary:
                write_shard(rollout_dir / f"iter_{it:04d}.jsonl.gz", records)
            timing = engine.timing.as_dict() | {"rollout_s": time.perf_counter() - t0}

            t1 = time.perf_counter()
            batch = rollout_batch(records, rl, max_len)
            sampled = score_rows(score, state.params, batch.tokens, rl.minibatch_size, dp)
            lam = lam_at(rl, cfg.loss.lam, it - 1)
            grads = (term_gradients(grad_fns, state.params, batch, lam, cfg.loss,
                                    rl.minibatch_size, dp)
                     if rl.measure_gradients else {})  # fmt: skip
            state, upd = update(train_step, state, batch, lam, rl, cfg.loss, update_rng(rl, it),
                                dp)  # fmt: skip
            updated = score_rows(score, state.params, batch.tokens, rl.minibatch_size, dp)
            engine.set_params(state.params)  # The update donated the sampling parameters.
            timing["update_s"] = time.perf_counter() - t1

            env_steps += sum(len(r["steps"]) for r in records)
            line = {"iteration": it, "env_steps": env_steps, "lam": lam,
                    **iteration_metrics(records, batch, sampled, updated, timing), **upd,
                    **grads, **task_metrics(records, bands),
                    **evaluations(engine, tasks, held, it, rl),
                    **(teacher(graphdef, state.params) if it == rl.iterations else {})}  # fmt: skip
            run.append_metrics(line)
            run.scalars.write(it, line)
            run.save(state, it, {"iteration": it, "env_steps": env_steps,
                                 "wall_s": time.perf_counter() - started})  # fmt: skip
            lines.append(line)
            log(format_line(line))
    summary = {
        "iterations": lines[-1]["iteration"],
        "env_steps": env_steps,
        "pool": pool["tasks"],
        "wall_s": time.perf_counter() - started,
        "objective": cfg.loss.objective,
        "lam": cfg.loss.lam,
        "start": start,
        "first": lines[0],
        "final": lines[-1],
    }
    run.write_json(SUMMARY, summary)
    run.close()
    return summary


def _silent(*_args, **_kwargs) -> None:
    pass


def task_pool(
    engine: SharedEngine, loaded, corpus_dir: str | None, rl: RLConfig, start: str | None
) -> dict:
    """The pool of rl.pool_file, one drawn by band from rl.pool_difficulty, or one chosen here
    by probing candidates from the start checkpoint."""
    if rl.pool_file:
        saved = read_pool(rl.pool_file)
        pool = {"tasks": saved["tasks"], "from": os.path.abspath(rl.pool_file)}
        pool |= {"bands": saved["bands"]} if saved["bands"] else {}
    elif rl.pool_difficulty:
        if not start:
            raise ConfigError("pool_difficulty reads the start checkpoint's table: give a start")
        pool = pool_by_band(rl, start)
    else:
        train_tasks = split_tasks(loaded, corpus_dir, rl.split)
        pool = choose_pool(engine, choose_tasks(train_tasks, rl.pool_candidates, rl.pool_seed), rl)
    if not pool["tasks"]:
        raise ValueError(f"no task's success rate lies in [{rl.pool_min_success}, "
                         f"{rl.pool_max_success}]: {pool}")  # fmt: skip
    return pool


def heldout_tasks(loaded, corpus_dir: str | None, rl: RLConfig) -> list[tuple[str, int]]:
    if not rl.eval_split:
        return []
    return choose_tasks(split_tasks(loaded, corpus_dir, rl.eval_split), rl.eval_max_tasks or None,
                        rl.eval_seed)  # fmt: skip


HELDOUT_CE_SPLITS = ("heldout_tasks", "heldout_scenarios")
HELDOUT_CE_METRICS = ("env_ce", "action_ce")


def heldout_ce(cfg: Config, vocab: Vocab, corpus_dir: str | None, rl: RLConfig, log):
    """`(graphdef, params) -> metrics`: teacher-forced env and action CE on fixed subsamples of
    the corpus's held-out splits (the world model's and the policy's held-out fit), or nothing
    without a corpus or with rl.heldout_ce_rows 0."""
    if not corpus_dir or not rl.heldout_ce_rows:
        return lambda graphdef, params: {}
    ecfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, paths=(corpus_dir,)),
        eval=dataclasses.replace(cfg.eval, splits=HELDOUT_CE_SPLITS, max_rows=rl.heldout_ce_rows),
    )
    evaluator = Evaluator.for_run(ecfg, vocab, None, None, log=_silent)

    def evaluate(graphdef, params) -> dict[str, float]:
        line = evaluator(0, graphdef, params)
        keys = [f"{s}/{m}" for s in HELDOUT_CE_SPLITS for m in HELDOUT_CE_METRICS]
        return {f"tf_{k}": line[k] for k in keys if k in line}

    return evaluate


def task_metrics(records: Sequence[dict[str, Any]], bands: dict[str, str]) -> dict[str, Any]:
    """Per task its successes in the iteration's group; the share of groups that all failed
    and that all succeeded (neither carries a policy gradient); success per difficulty band."""
    wins: dict[str, list[bool]] = {}
    for r in records:
        wins.setdefault(f"{r['scenario']}/{r['task_idx']}", []).append(
            r["step_reward_types"][-1] == SUCCESS
        )
    out: dict[str, Any] = {
        "task_successes": {k: int(sum(v)) for k, v in sorted(wins.items())},
        "all_fail_groups": float(np.mean([not any(v) for v in wins.values()])),
        "all_success_groups": float(np.mean([all(v) for v in wins.values()])),
    }
    for band in sorted(set(bands.values())):
        won = [w for k, v in wins.items() if bands.get(k) == band for w in v]
        out[f"success_{band}"] = float(np.mean(won)) if won else math.nan
    return out


def evaluations(engine: SharedEngine, tasks, held, iteration: int, rl: RLConfig) -> dict:
    """Greedy pass@1 on the pool and held out: at the start, the end and every eval_every."""
    due = iteration in (0, rl.iterations) or (rl.eval_every > 0 and iteration % rl.eval_every == 0)
    if not due:
        return {}
    out = {"pool_pass@1": greedy_pass(engine, tasks, rl.seed)}
    if held:
        out["heldout_pass@1"] = greedy_pass(engine, held, rl.seed)
    return out


def iteration_metrics(
    records: Sequence[dict[str, Any]],
    batch: RolloutBatch,
    sampled_NS: np.ndarray,
    updated_NS: np.ndarray,
    timing: dict[str, float],
) -> dict[str, float]:
    """One iteration's rollouts, rows and timings as the numbers of its metrics line."""
    steps = sum(len(r["steps"]) for r in records)
    stats = [rollout_stats(r) for r in records]
    format_errors = sum(sum(t in FORMAT_ERROR_TYPES for t in r["step_reward_types"])
                        for r in records)  # fmt: skip
    return {
        "rollouts": len(records),
        "success_rate": success_rate(records),
        "mean_reward": float(np.mean([r["reward"] for r in records])),
        "mean_training_reward": float(batch.rewards.mean()),
        "format_error_share": format_errors / steps,
        "parse_share": float(np.mean([s["parse_share"] for s in stats])),
        "mean_steps": steps / len(records),
        "env_ce_fresh": role_ce(sampled_NS, batch.roles, roles.ENV_OUTPUT),
        "action_ce_fresh": role_ce(sampled_NS, batch.roles, roles.ACTION),
        **logp_gap(batch, sampled_NS),
        "informative_groups": float(batch.informative.mean()),
        "kl": approx_kl(batch.sample_logp, updated_NS, batch.roles),
        "rows": batch.num_rows,
        "rollout_s": timing["rollout_s"],
        "update_s": timing["update_s"],
        "decode_tokens_per_s": timing["generated_tokens"] / max(timing["decode_s"], 1e-9),
        # Where the rollouts' time went (the engine's Timing; tool and verify summed over
        # episodes, which run beside the engine's loop).
        **{f"rollout_{k}": timing[k] for k in ROLLOUT_TIMES},
        "env_steps_per_s": steps / timing["rollout_s"],
    }


def format_line(line: dict[str, Any]) -> str:
    evals = "".join(f"  {k} {line[k]:.2f}" for k in ("pool_pass@1", "heldout_pass@1") if k in line)
    return (
        f"iter {line['iteration']:>3}  env steps {line['env_steps']:>5}  "
        f"success {line['success_rate']:.2f}  reward {line['mean_reward']:+.2f}  "
        f"format err {line['format_error_share']:.2f}  env_ce {line['env_ce_fresh']:.3f}  "
        f"pg {line['pg_loss']:+.4f}  clip {line['clip_frac']:.3f}  kl {line['kl']:.4f}  "
        f"gap {line['logp_gap_mean']:.1e}  "
        f"rollout {line['rollout_s']:.0f}s  update {line['update_s']:.0f}s" + evals
    )
