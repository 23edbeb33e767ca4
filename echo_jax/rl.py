"""On-policy GRPO / ECHO in the local AWM worlds: sample, verify, pack, update, repeat.

One iteration:
  1. draw `tasks_per_iteration` training tasks and run G rollouts of each with the current
     policy (the closed-loop agent of `echo_jax.closed_loop`, worlds in parallel threads);
  2. score each rollout with the task's verifier (the harness's final verify step), compute
     group-relative advantages per task, and pack the rollouts into fixed [B, T] rows with the
     one renderer -- the model's own generated text is ACTION, the world's replies ENV_OUTPUT,
     harness text WARNING or CONTEXT (`rollout_actions`);
  3. score the rows with the sampling policy (`old_logp`, PPO's ratio denominators, and the env
     CE of data the model has not trained on), then take `epochs` passes of minibatch updates
     with `echo_loss` (PPO-clip; λ from its schedule; rows that fail the env-term filters get
     env_weight 0);
  4. score again for the KL to the sampling policy, checkpoint, and optionally run a greedy
     held-out pass@1 evaluation.

old_logp is recomputed by a forward pass of the sampling parameters over the packed rows rather
than copied from the decoder: the two agree token for token where the canonical tokenisation of
the generated text is the generated token sequence, and the forward pass also covers the rest
(re-tokenised text, history windows cut differently from the prompt). `logp_agreement` reports
how far apart the two are on the steps where both exist.

Workdir: config.json and vocab.json (so `experiments.evaluate` reads an RL run like any
other), rl_config.json, metrics.jsonl (one line per iteration), rollouts/iter_NNNN.jsonl.gz
(capture format, each step's policy record included), checkpoints/<iteration>, summary.json.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from echo_jax import roles
from echo_jax.agent import POLICY_KEY, build_prompt, load_run
from echo_jax.awm.capture import LiveWorld, write_shard
from echo_jax.awm.harness import HarnessConfig
from echo_jax.awm.rewards import FORMAT_ERROR_TYPES
from echo_jax.awm.world_format import World, load_worlds
from echo_jax.closed_loop import (
    SUCCESS,
    _start,
    _TimedDecoder,
    evaluate_checkpoint,
    mute_fork_warning,
    run_agent_episode,
    split_tasks,
)
from echo_jax.config import AgentConfig, Config, ConfigError, RLConfig, validate, validate_rl
from echo_jax.decoding import Decoder
from echo_jax.episodes import Episode, parse_episode
from echo_jax.fused_loss import chunked_label_logprobs, resolve_impl
from echo_jax.loss import label_logprobs
from echo_jax.packing import PackedData, pack
from echo_jax.render import render_action, render_episode
from echo_jax.run_dir import RunDir
from echo_jax.sharding import data_parallel
from echo_jax.tokenizer import tokenize_rendered
from echo_jax.train import init_model, init_state, make_optimizer, make_train_step
from echo_jax.vocab import Vocab

RL_CONFIG = "rl_config.json"
ROLLOUT_DIR = "rollouts"
SUMMARY = "summary.json"


# --- λ schedule and rollout filters ---------------------------------------------------------


def lam_at(rl: RLConfig, lam: float, iteration: int) -> float:
    """λ of iteration (0-based) under rl.lam_schedule, starting from loss.lam."""
    if rl.lam_schedule == "constant":
        return lam
    if rl.lam_schedule == "linear":
        frac = iteration / max(rl.iterations - 1, 1)
        return lam + (rl.lam_final - lam) * frac
    return lam * rl.lam_decay ** (iteration // rl.lam_step_every)


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


def rollout_actions(record: dict[str, Any]) -> list[list[tuple[str, int]]]:
    """Per step, the segments its call is rendered as: the generated text itself (ACTION) where
    the policy wrote it, a newline (CONTEXT) closing an unclosed call so roles stay on token
    boundaries, and the harness's own forced verify as CONTEXT."""
    out = []
    for step in record["steps"]:
        policy = step.get(POLICY_KEY)
        if policy is None:
            action = step["action"]
            text = render_action(action["tool_name"], action.get("arguments", {}))
            out.append([(text, roles.CONTEXT)])
            continue
        text = policy["text"]
        segments = [(text, roles.ACTION)] if text else []
        if not text.endswith("\n"):
            segments.append(("\n", roles.CONTEXT))
        out.append(segments)
    return out


@dataclasses.dataclass(frozen=True)
class RolloutBatch:
    data: PackedData  # rows of the iteration's rollouts (advantages from the training reward)
    env_weight: np.ndarray  # float32 [N]: 0 for rows of rollouts the env-term filters drop
    episodes: list[Episode]


def pack_rollouts(
    records: Sequence[dict[str, Any]], vocab: Vocab, cfg: Config, rl: RLConfig, source: str
) -> RolloutBatch:
    """Rollouts -> role-masked rows exactly as captured episodes, but with generated text."""
    episodes, tokenized = [], []
    for i, record in enumerate(records):
        ep = parse_episode(record, f"{source}#{i}")
        ep = dataclasses.replace(ep, reward=training_reward(record, rl))
        rendered = render_episode(ep, cfg.data.canonical_json, rollout_actions(record))
        episodes.append(ep)
        tokenized.append(tokenize_rendered(rendered))
    data = pack(episodes, tokenized, vocab, cfg.data.max_len, cfg.data.overflow)
    kept = np.array([env_term_kept(r, rl) for r in records], np.float32)
    return RolloutBatch(data, kept[data.episode], episodes)


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


def recorded_logp_gap(records: Sequence[dict[str, Any]], vocab: Vocab, score, params, t: int):
    """Mean |decoder logp - forward-pass logp| over generated tokens of first steps (whose
    prompt, the CONTEXT prefix and call marker, is never cut): a check that the recorded
    log-probs are the sampling policy's."""
    gaps = []
    for record in records:
        step = record["steps"][0]
        policy = step.get(POLICY_KEY)
        if policy is None or not policy["tokens"]:
            continue
        prompt, _ = build_prompt(record["task"], record["tools"], [], vocab, t)
        ids = np.concatenate([prompt, np.asarray(policy["tokens"], np.int32)])[:t]
        row = np.zeros((1, t), np.int32)
        row[0, : ids.size] = ids
        logp = np.asarray(score(params, row))[0, prompt.size - 1 : ids.size - 1]
        gaps.append(np.abs(logp - np.asarray(policy["logp"][: logp.size])).mean())
        if len(gaps) == 4:
            break
    return float(np.mean(gaps)) if gaps else math.nan


def update(
    train_step,
    state,
    batch: RolloutBatch,
    old_logp_NS: np.ndarray,
    lam: float,
    rl: RLConfig,
    rng: np.random.Generator,
    dp,
):
    """`epochs` passes of minibatch PPO-clip updates; returns the state and mean metrics."""
    data, b = batch.data, rl.minibatch_size
    n = data.num_rows
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

    pending = None
    for _ in range(rl.epochs):
        order = rng.permutation(n)
        order = np.concatenate([order, np.full(padded_rows(n, b) - n, -1)])
        for lo in range(0, len(order), b):
            idx = order[lo : lo + b]
            real = idx >= 0
            take = np.where(real, idx, 0)
            mb = {
                "tokens": np.where(real[:, None], data.tokens[take], 0).astype(np.int32),
                "roles": np.where(real[:, None], data.roles[take], roles.PAD).astype(np.int32),
                "advantage": np.where(real, data.advantage[take], 0.0).astype(np.float32),
                "old_logp": np.where(real[:, None], old_logp_NS[take], 0.0).astype(np.float32),
                "env_weight": np.where(real, batch.env_weight[take], 0.0).astype(np.float32),
            }
            mb = jax.device_put(mb, dp.batch) | {"lam": jax.device_put(lam_, dp.replicated)}
            state, metrics = train_step(state, mb)
            if pending is not None:
                read(pending)
            pending = metrics
            steps += 1
    read(pending)
    return state, {k: v / steps for k, v in sums.items()} | {"update_steps": steps}


def approx_kl(old_logp_NS, new_logp_NS, roles_NT) -> float:
    """KL(sampling policy || updated policy) on the action tokens, Schulman's k3 estimator."""
    mask = roles_NT[:, 1:] == roles.ACTION
    if not mask.any():
        return math.nan
    log_ratio = (new_logp_NS - old_logp_NS)[mask].astype(np.float64)
    return float(np.mean(np.expm1(log_ratio) - log_ratio))


# --- rollouts in the worlds -----------------------------------------------------------------


class WorldPool:
    """One live server per scenario, started on first use and kept across iterations, and the
    threads that step them. The threads live as long as the pool: a server gets SIGKILL when
    the thread that started it ends (PR_SET_PDEATHSIG follows the parent thread), so servers
    started by short-lived threads would die between iterations."""

    def __init__(self, worlds: dict[str, World], workers: int):
        self.worlds = worlds
        self.live: dict[str, LiveWorld] = {}
        self.lock = threading.Lock()
        self.threads = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="world")

    def get(self, scenario: str) -> LiveWorld:
        with self.lock:
            live = self.live.get(scenario)
            if live is None:
                live = self.live[scenario] = LiveWorld(self.worlds[scenario])
                _start(live)
            return live

    def close(self) -> None:
        self.threads.shutdown(wait=True)
        for live in self.live.values():
            live.close()
        self.live.clear()


def rollout_key(seed: int, iteration: int, scenario: str, task_idx: int, g: int) -> jax.Array:
    digest = [ord(c) for c in scenario]
    rng = np.random.default_rng([seed, iteration, task_idx, g, *digest])
    return jax.random.key(int(rng.integers(2**31)))


def collect_rollouts(
    pool: WorldPool,
    tasks: Sequence[tuple[str, int]],
    decoder: Decoder,
    rl: RLConfig,
    iteration: int,
    canonical_json: bool,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """G rollouts of each task; a scenario's rollouts run in order on its world, scenarios in
    parallel threads. Returned in (task, g) order whatever the threads' timing."""
    generate = _TimedDecoder(decoder, rl.temperature, rl.top_p)
    harness = HarnessConfig(max_tool_calls=rl.max_steps)
    by_scenario: dict[str, list[tuple[int, int, int]]] = {}
    for n, (scenario, task_idx) in enumerate(tasks):
        for g in range(rl.group_size):
            by_scenario.setdefault(scenario, []).append((n, task_idx, g))

    def run_scenario(scenario: str) -> list[tuple[tuple[int, int], dict[str, Any]]]:
        live = pool.get(scenario)
        out = []
        for n, task_idx, g in by_scenario[scenario]:
            key = rollout_key(rl.seed, iteration, scenario, task_idx, g)
            ep = run_agent_episode(live, task_idx, generate, decoder, key, harness, canonical_json)
            ep["agent"] = {"iteration": iteration, "sample": g, "seed": rl.seed,
                           "temperature": rl.temperature, "top_p": rl.top_p}  # fmt: skip
            out.append(((n, g), ep))
        return out

    parts = pool.threads.map(run_scenario, sorted(by_scenario))
    results = [r for part in parts for r in part]
    records = [ep for _, ep in sorted(results, key=lambda r: r[0])]
    timing = {"decode_tokens": generate.tokens, "decode_s": generate.seconds}
    return records, timing


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
        from echo_jax.dataset import load_packed

        _, vocab = load_packed(cfg.data)
        graphdef, params = init_model(cfg, vocab.size, rl.seed)
    validate(cfg)
    run = RunDir.open(workdir, cfg, resume=False)
    run.claim()
    vocab.save(run.file(RunDir.VOCAB))
    run.write_json(RL_CONFIG, {"rl": dataclasses.asdict(rl), "start": start})
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
    train_tasks = split_tasks(loaded, corpus_dir, rl.split)
    if not train_tasks:
        raise ValueError(f"no tasks of split {rl.split!r} among the worlds in {worlds}")
    tcfg = cfg.train
    # A (constant) schedule keeps the optimiser state's structure that of training runs, so RL
    # checkpoints restore through the same template (agent.load_run).
    tx = make_optimizer(tcfg, schedule=optax.constant_schedule(rl.learning_rate))
    dp = data_parallel(rl.minibatch_size)
    state = jax.device_put(init_state(params, tx), dp.replicated)
    train_step = make_train_step(graphdef, tx, cfg.loss)
    score = make_score_fn(graphdef, cfg.loss.impl, cfg.loss.chunk_size)
    t = cfg.data.max_len
    rng = np.random.default_rng([rl.seed, 1])
    pool = WorldPool(loaded, rl.workers)
    rollout_dir = Path(run.path) / ROLLOUT_DIR
    rollout_dir.mkdir(exist_ok=True)
    agent = AgentConfig(temperature=0.0, max_new_tokens=rl.max_new_tokens, max_steps=rl.max_steps)

    def held_out(iteration: int) -> dict[str, float]:
        if not rl.eval_split:
            return {}
        m = evaluate_checkpoint(
            run.path, rl.eval_split, 0, worlds=worlds, corpus_dir=corpus_dir, agent=agent,
            max_tasks=rl.eval_max_tasks or None, scenarios=scenarios, tool_call_positions=0,
            seed=rl.seed, step=iteration,
        )  # fmt: skip
        return {"heldout_pass@1": m["pass@1_greedy"], "heldout_tasks": m["tasks"]}

    def eval_due(iteration: int, last: bool) -> bool:
        return iteration == 0 or last or (rl.eval_every > 0 and iteration % rl.eval_every == 0)

    env_steps = 0
    lines = []
    started = time.perf_counter()
    try:
        run.save(state, 0, {"iteration": 0, "env_steps": 0})
        first = {"iteration": 0, "env_steps": 0, **held_out(0)}
        run.append_metrics(first)
        lines.append(first)
        for it in range(rl.iterations):
            t0 = time.perf_counter()
            decoder = Decoder(graphdef, state.params, vocab, t, rl.max_new_tokens)
            draw = np.random.default_rng([rl.seed, it]).permutation(len(train_tasks))
            tasks = sorted(train_tasks[i] for i in draw[: rl.tasks_per_iteration])
            records, timing = collect_rollouts(
                pool, tasks, decoder, rl, it + 1, cfg.data.canonical_json
            )
            write_shard(rollout_dir / f"iter_{it + 1:04d}.jsonl.gz", records)
            rollout_s = time.perf_counter() - t0

            t1 = time.perf_counter()
            batch = pack_rollouts(records, vocab, cfg, rl, f"{rollout_dir}/iter_{it + 1:04d}")
            old_logp = score_rows(score, state.params, batch.data.tokens, rl.minibatch_size)
            gap = recorded_logp_gap(records, vocab, score, state.params, t - rl.max_new_tokens)
            lam = lam_at(rl, cfg.loss.lam, it)
            state, upd = update(train_step, state, batch, old_logp, lam, rl, rng, dp)
            new_logp = score_rows(score, state.params, batch.data.tokens, rl.minibatch_size)
            update_s = time.perf_counter() - t1

            stats = [rollout_stats(r) for r in records]
            steps_now = sum(len(r["steps"]) for r in records)
            env_steps += steps_now
            last = it + 1 == rl.iterations or (rl.env_steps and env_steps >= rl.env_steps)
            run.save(state, it + 1, {"iteration": it + 1, "env_steps": env_steps})
            line = {
                "iteration": it + 1,
                "env_steps": env_steps,
                "rollouts": len(records),
                "mean_reward": float(np.mean([r["reward"] for r in records])),
                "mean_training_reward": float(np.mean([ep.reward for ep in batch.episodes])),
                "success_rate": float(np.mean([s["success"] for s in stats])),
                "format_error_share": sum(
                    s["format_error_share"] * len(r["steps"])
                    for s, r in zip(stats, records, strict=True)
                )
                / steps_now,
                "parse_share": float(np.mean([s["parse_share"] for s in stats])),
                "mean_steps": steps_now / len(records),
                "env_ce_fresh": role_ce(old_logp, batch.data.roles, roles.ENV_OUTPUT),
                "action_ce_fresh": role_ce(old_logp, batch.data.roles, roles.ACTION),
                "env_rows_kept": float(batch.env_weight.mean()),
                "informative_groups": float(
                    np.mean(
                        [
                            np.ptp([e.reward for e in batch.episodes[i : i + rl.group_size]]) > 0
                            for i in range(0, len(records), rl.group_size)
                        ]
                    )
                ),  # fmt: skip
                "lam": lam,
                **upd,
                "kl": approx_kl(old_logp, new_logp, batch.data.roles),
                "logp_agreement": gap,
                "rows": batch.data.num_rows,
                "rollout_s": rollout_s,
                "update_s": update_s,
                "decode_tokens_per_s": timing["decode_tokens"] / max(timing["decode_s"], 1e-9),
            }
            if eval_due(it + 1, bool(last)):
                line.update(held_out(it + 1))
            run.append_metrics(line)
            lines.append(line)
            log(format_line(line))
            if last:
                break
    finally:
        pool.close()
    summary = {
        "iterations": lines[-1]["iteration"],
        "env_steps": env_steps,
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
    held = line.get("heldout_pass@1")
    return (
        f"iter {line['iteration']:>3}  env steps {line['env_steps']:>5}  "
        f"success {line['success_rate']:.2f}  reward {line['mean_reward']:+.2f}  "
        f"format err {line['format_error_share']:.2f}  env_ce {line['env_ce_fresh']:.3f}  "
        f"pg {line['pg_loss']:+.4f}  clip {line['clip_frac']:.3f}  kl {line['kl']:.4f}  "
        f"rollout {line['rollout_s']:.0f}s  update {line['update_s']:.0f}s"
        + (f"  held-out pass@1 {held:.2f}" if held is not None else "")
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
