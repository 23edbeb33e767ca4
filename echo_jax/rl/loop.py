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
     and the env CE of fresh rollouts.
  4. `update`: `epochs` passes of minibatch PPO-clip steps of `echo_loss`, old log-probs the
     recorded ones; then the KL to the sampling policy on the sampled tokens, a checkpoint, and
     every `eval_every` iterations greedy pass@1 on the pool and on held-out tasks.

Workdir: config.json and vocab.json (so `experiments.evaluate` reads an RL run like any
other), rl_config.json, pool.json, metrics.jsonl (one line per iteration),
rollouts/iter_NNNN.jsonl.gz (capture format with each step's policy record and the rows),
checkpoints/<iteration>, summary.json.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from echo_jax.agent.closed_loop import SUCCESS, choose_tasks, mute_fork_warning, split_tasks
from echo_jax.agent.policy import POLICY_KEY, load_run
from echo_jax.agent.rollout import EngineConfig, EpisodeRequest, RolloutEngine
from echo_jax.agent.rollout_rows import (
    EPISODE_ROWS,
    TOOL_ERROR,
    TOOL_RESULT,
    VERIFIER,
    WARNING_TEXT,
)
from echo_jax.awm.capture import write_shard
from echo_jax.awm.rewards import FORMAT_ERROR_TYPES
from echo_jax.awm.world_format import load_worlds
from echo_jax.config import Config, ConfigError, RLConfig, validate, validate_rl
from echo_jax.data import roles
from echo_jax.data.advantages import group_advantages
from echo_jax.data.vocab import PAD_ID, Vocab
from echo_jax.objective.fused_loss import chunked_label_logprobs, resolve_impl
from echo_jax.objective.loss import label_logprobs
from echo_jax.train.run_dir import RunDir
from echo_jax.train.sharding import data_parallel
from echo_jax.train.trainer import init_model, init_state, make_optimizer, make_train_step
from echo_jax.util.atomic import atomic_write_text

RL_CONFIG = "rl_config.json"
POOL = "pool.json"
ROLLOUT_DIR = "rollouts"
SUMMARY = "summary.json"


# --- λ schedule, rewards and rollout filters -------------------------------------------------


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


def rollout_stats(record: dict[str, Any]) -> dict[str, float]:
    """Shares of a rollout: over the calls the policy wrote, those that were valid tool calls
    (not a format error) and those that parsed; over all steps, format errors; and success."""
    types = record["step_reward_types"]
    written = [
        (s[POLICY_KEY], t) for s, t in zip(record["steps"], types, strict=True) if POLICY_KEY in s
    ]
    n = len(written)
    return {
        "valid_call_share": sum(t not in FORMAT_ERROR_TYPES for _, t in written) / n if n else 0.0,
        "parse_share": sum(p["parse_error"] is None for p, _ in written) / n if n else 0.0,
        "format_error_share": sum(t in FORMAT_ERROR_TYPES for t in types) / len(types),
        "success": float(types[-1] == SUCCESS),
    }


def training_reward(record: dict[str, Any], rl: RLConfig) -> float:
    """The verifier's reward, less the format penalty per share of format-error steps."""
    return record["reward"] - rl.format_penalty * rollout_stats(record)["format_error_share"]


def env_term_kept(record: dict[str, Any], rl: RLConfig) -> bool:
    stats = rollout_stats(record)
    return (
        stats["valid_call_share"] >= rl.min_valid_call_share
        and stats["parse_share"] >= rl.min_parse_share
    )


# --- rollouts to rows -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RolloutBatch:
    """An iteration's rollouts as training rows, N rows of T tokens."""

    tokens: np.ndarray  # int32 [N, T]: exactly what the sampler consumed and produced, PAD after
    roles: np.ndarray  # int8 [N, T]: each token's role as a target
    sample_logp: np.ndarray  # float32 [N, T-1]: recorded log-prob of each sampled target (else 0)
    advantage: np.ndarray  # float32 [N]: the episode's group-relative advantage
    pg_weight: np.ndarray  # float32 [N]: row's share of its episode's action tokens
    env_weight: np.ndarray  # float32 [N, T-1]: env-term weight of each target
    episode: np.ndarray  # int32 [N]: index of the rollout
    rewards: np.ndarray  # float32 [E]: training reward per rollout
    informative: np.ndarray  # bool [E]: the rollout's group has more than one reward

    @property
    def num_rows(self) -> int:
        return int(self.tokens.shape[0])


def rollout_batch(records: Sequence[dict[str, Any]], rl: RLConfig, max_len: int) -> RolloutBatch:
    """The rollouts' recorded rows as arrays. Groups are (scenario, task_idx)."""
    keys = [(r["scenario"], r["task_idx"]) for r in records]
    group_ids = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    groups_E = np.array([group_ids[k] for k in keys], np.int32)
    rewards_E = np.array([training_reward(r, rl) for r in records], np.float32)
    adv_E = np.asarray(group_advantages(rewards_E, groups_E, len(group_ids)))
    spread_G = np.zeros(len(group_ids), bool)
    for g in range(len(group_ids)):
        spread_G[g] = np.ptp(rewards_E[groups_E == g]) > 0
    informative_E = spread_G[groups_E]
    kind_weight = np.zeros(8, np.float32)
    kind_weight[[TOOL_RESULT, TOOL_ERROR, VERIFIER, WARNING_TEXT]] = (
        rl.weight_tool_result, rl.weight_tool_error, rl.weight_verifier, rl.weight_warning
    )  # fmt: skip
    rows = [(e, row) for e, r in enumerate(records) for row in r[EPISODE_ROWS]]
    n, t = len(rows), max_len
    tokens = np.full((n, t), PAD_ID, np.int32)
    roles_NT = np.full((n, t), roles.PAD, np.int8)
    logp = np.zeros((n, t), np.float32)
    kinds = np.zeros((n, t), np.int32)
    for i, (_, row) in enumerate(rows):
        m = len(row["tokens"])
        if m > t:
            raise ValueError(f"a recorded row of {m} tokens does not fit max_len={t}")
        tokens[i, :m], roles_NT[i, :m] = row["tokens"], row["roles"]
        logp[i, :m], kinds[i, :m] = row["logp"], row["kinds"]
    episode = np.array([e for e, _ in rows], np.int32)
    actions_N = (roles_NT == roles.ACTION).sum(axis=1).astype(np.float32)
    actions_E = np.bincount(episode, actions_N, minlength=len(records))
    kept_E = np.array([env_term_kept(r, rl) for r in records], np.float32)
    if rl.drop_equal_reward_groups:
        kept_E = kept_E * informative_E
    env_weight = kind_weight[kinds[:, 1:]] * kept_E[episode][:, None]
    return RolloutBatch(
        tokens=tokens,
        roles=roles_NT,
        sample_logp=logp[:, 1:],
        advantage=adv_E[episode].astype(np.float32),
        pg_weight=(actions_N / np.maximum(actions_E[episode], 1.0)).astype(np.float32),
        env_weight=env_weight.astype(np.float32),
        episode=episode,
        rewards=rewards_E,
        informative=informative_E,
    )


# --- scoring and updating -------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def make_score_fn(graphdef: nnx.GraphDef, impl: str, chunk_size: int):
    """Jitted `(params, tokens_BT) -> logp_BS`, log-probs of every next token (S = T - 1)."""

    def score(params, tokens_BT):
        model = nnx.merge(graphdef, params)
        if resolve_impl(impl) == "chunked":
            h_BTD = model.features(tokens_BT)
            return chunked_label_logprobs(
                h_BTD[:, :-1], model.output_matrix(), tokens_BT[:, 1:], None, chunk_size
            )
        return label_logprobs(model(tokens_BT), tokens_BT)

    return jax.jit(score)


def padded_rows(n: int, batch: int) -> int:
    return max(batch, -(-n // batch) * batch)


def score_rows(score, params, tokens_NT: np.ndarray, batch: int) -> np.ndarray:
    """logp [N, T-1] of every row, in fixed-size calls (the tail padded with PAD rows)."""
    n, t = tokens_NT.shape
    padded = np.zeros((padded_rows(n, batch), t), np.int32)
    padded[:n] = tokens_NT
    out = [score(params, padded[i : i + batch]) for i in range(0, len(padded), batch)]
    return np.concatenate(jax.device_get(out))[:n]  # Every call dispatched before one read.


def role_ce(logp_NS: np.ndarray, roles_NT: np.ndarray, role: int) -> float:
    mask = roles_NT[:, 1:] == role
    return float(-logp_NS[mask].mean()) if mask.any() else math.nan


def logp_gap(batch: RolloutBatch, logp_NS: np.ndarray) -> dict[str, float]:
    """Mean and max |recorded sampling log-prob - forward-pass log-prob| over every sampled
    token: 0 up to float rounding when the rows are what the sampler saw."""
    mask = batch.roles[:, 1:] == roles.ACTION
    if not mask.any():
        return {"logp_gap_mean": math.nan, "logp_gap_max": math.nan, "logp_gap_tokens": 0}
    gap = np.abs(logp_NS[mask].astype(np.float64) - batch.sample_logp[mask])
    return {
        "logp_gap_mean": float(gap.mean()),
        "logp_gap_max": float(gap.max()),
        "logp_gap_tokens": int(mask.sum()),
    }


def update(train_step, state, batch: RolloutBatch, lam: float, rl: RLConfig,
           rng: np.random.Generator, dp):  # fmt: skip
    """`epochs` passes of minibatch PPO-clip updates; returns the state and mean metrics."""
    b, n = rl.minibatch_size, batch.num_rows
    lam_ = np.float32(lam)
    sums: dict[str, float] = {}
    steps = 0

    def read(metrics) -> None:  # Step N-1's metrics, read once step N is dispatched.
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if host["nonfinite"]:
            raise FloatingPointError(
                f"non-finite loss or gradient in an RL update (loss={host['loss']}, "
                f"grad_norm={host['grad_norm']}); the update was not applied"
            )
        for k in ("loss", "pg_loss", "env_loss", "clip_frac", "grad_norm"):
            sums[k] = sums.get(k, 0.0) + host[k]

    def rows(idx: np.ndarray) -> dict[str, np.ndarray]:
        real = idx >= 0
        take = np.where(real, idx, 0)

        def pick(x, fill=0):
            mask = real.reshape(-1, *([1] * (x.ndim - 1)))
            return np.where(mask, x[take], fill)

        return {
            "tokens": pick(batch.tokens).astype(np.int32),
            "roles": pick(batch.roles, roles.PAD).astype(np.int32),
            "advantage": pick(batch.advantage).astype(np.float32),
            "old_logp": pick(batch.sample_logp).astype(np.float32),
            "pg_weight": pick(batch.pg_weight).astype(np.float32),
            "env_weight": pick(batch.env_weight).astype(np.float32),
        }

    pending = None
    for _ in range(rl.epochs):
        order = rng.permutation(n)
        order = np.concatenate([order, np.full(padded_rows(n, b) - n, -1)])
        for lo in range(0, len(order), b):
            mb = jax.device_put(rows(order[lo : lo + b]), dp.batch)
            state, metrics = train_step(state, mb | {"lam": jax.device_put(lam_, dp.replicated)})
            if pending is not None:
                read(pending)
            pending = metrics
            steps += 1
    read(pending)
    return state, {k: v / steps for k, v in sums.items()} | {"update_steps": steps}


def approx_kl(old_logp_NS, new_logp_NS, roles_NT) -> float:
    """KL(sampling policy || updated policy) on the sampled tokens in the contexts they were
    sampled in (the rows), Schulman's k3 estimator."""
    mask = roles_NT[:, 1:] == roles.ACTION
    if not mask.any():
        return math.nan
    log_ratio = (new_logp_NS - old_logp_NS)[mask].astype(np.float64)
    return float(np.mean(np.expm1(log_ratio) - log_ratio))


# --- the task pool and greedy evaluations --------------------------------------------------


def rollout_seed(seed: int, iteration: int, scenario: str, task_idx: int, g: int) -> int:
    rng = np.random.default_rng([seed, iteration, task_idx, g, *(ord(c) for c in scenario)])
    return int(rng.integers(2**31))


def group_requests(tasks, iteration: int, seed: int, g: int, temperature: float):
    """g rollouts of each task, each with its own sampling seed (greedy at temperature 0)."""
    return [
        EpisodeRequest(scenario, task_idx, rollout_seed(seed, iteration, scenario, task_idx, k),
                       temperature, 1.0, {"iteration": iteration, "sample": k, "seed": seed,
                                          "temperature": temperature, "top_p": 1.0})
        for scenario, task_idx in tasks
        for k in range(g)
    ]  # fmt: skip


def success_rate(records: Sequence[dict[str, Any]]) -> float:
    return float(np.mean([r["step_reward_types"][-1] == SUCCESS for r in records]))


def choose_pool(engine: RolloutEngine, candidates, rl: RLConfig) -> dict[str, Any]:
    """Probes each candidate task with rl.pool_probe sampled rollouts and keeps those whose
    success rate lies in [pool_min_success, pool_max_success], closest to 0.5 first."""
    records = engine.run(group_requests(candidates, 0, rl.pool_seed, rl.pool_probe, 1.0))
    rates = [success_rate(records[i * rl.pool_probe : (i + 1) * rl.pool_probe])
             for i in range(len(candidates))]  # fmt: skip
    band = [(abs(p - 0.5), c, p) for c, p in zip(candidates, rates, strict=True)
            if rl.pool_min_success <= p <= rl.pool_max_success]  # fmt: skip
    chosen = sorted(band)[: rl.pool_size]
    return {
        "tasks": sorted([list(c) for _, c, _ in chosen]),
        "probe_success": {f"{s}/{t}": p for (s, t), p in zip(candidates, rates, strict=True)},
        "probe_env_steps": sum(len(r["steps"]) for r in records),
        "settings": {k: getattr(rl, k) for k in ("pool_size", "pool_candidates", "pool_probe",
                     "pool_min_success", "pool_max_success", "pool_seed", "split")},
    }  # fmt: skip


def greedy_pass(engine: RolloutEngine, tasks, seed: int) -> float:
    return success_rate(engine.run(group_requests(tasks, 0, seed, 1, 0.0)))


# --- the loop -------------------------------------------------------------------------------


def start_run(
    workdir: str, start: str | None, cfg: Config | None, rl: RLConfig
) -> tuple[Config, Vocab, nnx.GraphDef, Any, RunDir]:
    """Claims the workdir; the model and vocabulary come from `start` (a training run's
    workdir) or, with start=None, from `cfg` and a vocabulary built from its data."""
    if start:
        start_cfg, vocab, graphdef, params, _ = load_run(start)
        cfg = dataclasses.replace(start_cfg, loss=cfg.loss) if cfg else start_cfg
    else:
        if cfg is None:
            raise ValueError("from scratch (no start checkpoint) needs a Config")
        from echo_jax.data.dataset import load_packed

        _, vocab = load_packed(cfg.data)
        graphdef, params = init_model(cfg, vocab.size, rl.seed)
    validate(cfg)
    run = RunDir.open(workdir, cfg, resume=False)
    run.claim()
    vocab.save(run.file(RunDir.VOCAB))
    run.write_json(RL_CONFIG, {"rl": dataclasses.asdict(rl), "start": start})
    return cfg, vocab, graphdef, params, run


def load_pool(path: str) -> list[tuple[str, int]]:
    with open(path) as f:
        return [(s, int(t)) for s, t in json.load(f)["tasks"]]


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
) -> dict[str, Any]:
    """The whole on-policy run; returns its summary (also in WORKDIR/summary.json).

    start   a training run's workdir to start from (its model, vocabulary and data settings;
            `cfg`, if given, supplies the loss), or None to start from scratch with `cfg`.
    """
    validate_rl(rl)
    if cfg is not None and cfg.loss.advantage != "group":
        raise ConfigError("on-policy updates use group advantages: set loss.advantage='group'")
    mute_fork_warning()
    cfg, vocab, graphdef, params, run = start_run(workdir, start, cfg, rl)
    loaded = load_worlds(worlds, scenarios)
    tx = make_optimizer(cfg.train, schedule=optax.constant_schedule(rl.learning_rate))
    dp = data_parallel(rl.minibatch_size)
    state = jax.device_put(init_state(params, tx), dp.replicated)
    train_step = make_train_step(graphdef, tx, cfg.loss)
    score = make_score_fn(graphdef, cfg.loss.impl, cfg.loss.chunk_size)
    t = cfg.data.max_len
    rng = np.random.default_rng([rl.seed, 1])
    rollout_dir = Path(run.path) / ROLLOUT_DIR
    rollout_dir.mkdir(exist_ok=True)
    engine = RolloutEngine(graphdef, state.params, vocab, t, loaded, EngineConfig.of(rl),
                           cfg.data.canonical_json)  # fmt: skip
    with engine:
        if rl.pool_file:
            pool = {"tasks": load_pool(rl.pool_file), "from": os.path.abspath(rl.pool_file)}
        else:
            train_tasks = split_tasks(loaded, corpus_dir, rl.split)
            candidates = choose_tasks(train_tasks, rl.pool_candidates, rl.pool_seed)
            pool = choose_pool(engine, candidates, rl)
        tasks = [tuple(x) for x in pool["tasks"]]
        if not tasks:
            raise ValueError(f"no task's success rate lies in [{rl.pool_min_success}, "
                             f"{rl.pool_max_success}]: {pool}")  # fmt: skip
        run.write_json(POOL, pool)
        held = []
        if rl.eval_split:
            held = split_tasks(loaded, corpus_dir, rl.eval_split)
            held = choose_tasks(held, rl.eval_max_tasks or None, rl.seed)

        def evaluations(iteration: int) -> dict[str, float]:
            due = iteration in (0, rl.iterations) or (
                rl.eval_every > 0 and iteration % rl.eval_every == 0
            )
            if not due:
                return {}
            out = {"pool_pass@1": greedy_pass(engine, tasks, rl.seed)}
            if held:
                out["heldout_pass@1"] = greedy_pass(engine, held, rl.seed)
            return out

        env_steps = 0
        lines = []
        started = time.perf_counter()
        run.save(state, 0, {"iteration": 0, "env_steps": 0})
        first = {"iteration": 0, "env_steps": 0, "pool_tasks": len(tasks), **evaluations(0)}
        run.append_metrics(first)
        lines.append(first)
        for it in range(rl.iterations):
            t0 = time.perf_counter()
            records = engine.run(group_requests(tasks, it + 1, rl.seed, rl.group_size, 1.0))
            write_shard(rollout_dir / f"iter_{it + 1:04d}.jsonl.gz", records)
            rollout_s = time.perf_counter() - t0
            timing = engine.timing.as_dict()

            t1 = time.perf_counter()
            batch = rollout_batch(records, rl, t)
            sampled = score_rows(score, state.params, batch.tokens, rl.minibatch_size)
            lam = lam_at(rl, cfg.loss.lam, it)
            state, upd = update(train_step, state, batch, lam, rl, rng, dp)
            updated = score_rows(score, state.params, batch.tokens, rl.minibatch_size)
            engine.set_params(state.params)  # The update donated the sampling parameters.
            update_s = time.perf_counter() - t1

            steps_now = sum(len(r["steps"]) for r in records)
            env_steps += steps_now
            run.save(state, it + 1, {"iteration": it + 1, "env_steps": env_steps})
            stats = [rollout_stats(r) for r in records]
            format_errors = sum(sum(t in FORMAT_ERROR_TYPES for t in r["step_reward_types"])
                                for r in records)  # fmt: skip
            line = {
                "iteration": it + 1,
                "env_steps": env_steps,
                "rollouts": len(records),
                "success_rate": success_rate(records),
                "mean_reward": float(np.mean([r["reward"] for r in records])),
                "mean_training_reward": float(batch.rewards.mean()),
                "format_error_share": format_errors / steps_now,
                "parse_share": float(np.mean([s["parse_share"] for s in stats])),
                "mean_steps": steps_now / len(records),
                "env_ce_fresh": role_ce(sampled, batch.roles, roles.ENV_OUTPUT),
                "action_ce_fresh": role_ce(sampled, batch.roles, roles.ACTION),
                **logp_gap(batch, sampled),
                "informative_groups": float(batch.informative.mean()),
                "lam": lam,
                **upd,
                "kl": approx_kl(batch.sample_logp, updated, batch.roles),
                "rows": batch.num_rows,
                "rollout_s": rollout_s,
                "update_s": update_s,
                "decode_tokens_per_s": timing["generated_tokens"] / max(timing["decode_s"], 1e-9),
                "env_steps_per_s": steps_now / rollout_s,
                **evaluations(it + 1),
            }  # fmt: skip
            run.append_metrics(line)
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
    return summary


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


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    return RunDir(workdir).read_metrics()


def remove_unfinished(workdir: str) -> bool:
    """An RL run without summary.json was interrupted; it restarts from scratch (rollouts are
    not resumable mid-iteration). Returns whether it was removed."""
    if os.path.isdir(workdir) and not os.path.exists(os.path.join(workdir, SUMMARY)):
        shutil.rmtree(workdir)
        return True
    return False


def make_pool(
    out_path: str,
    start: str,
    rl: RLConfig,
    worlds: str,
    corpus_dir: str | None,
    scenarios: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Chooses the pool from the `start` run's checkpoint (`choose_pool`) and writes it to
    out_path, so that every arm and seed of a sweep trains on the same tasks."""
    validate_rl(rl)
    mute_fork_warning()
    cfg, vocab, graphdef, params, _ = load_run(start)
    loaded = load_worlds(worlds, scenarios)
    candidates = choose_tasks(split_tasks(loaded, corpus_dir, rl.split), rl.pool_candidates,
                              rl.pool_seed)  # fmt: skip
    with RolloutEngine(graphdef, params, vocab, cfg.data.max_len, loaded, EngineConfig.of(rl),
                       cfg.data.canonical_json) as engine:  # fmt: skip
        pool = choose_pool(engine, candidates, rl)
    atomic_write_text(out_path, json.dumps(pool, indent=2, sort_keys=True))
    return pool
