"""Closed-loop evaluation of a checkpoint: the model agent acts in the local AWM worlds.

For every task of a split it runs one greedy episode and K sampled ones through the same
harness, world servers and MCP client as capture, and reports pass@1 (greedy), pass@k for
k <= K (the unbiased estimator 1 - C(n-c, k) / C(n, k) over the K samples), mean steps, the
share of format-error steps, and, teacher-forced on the corpus's successful episodes of those
tasks, tool-call accuracy. Rollouts are written in the capture format, atomically, so
`episodes.load_episodes` reads them back and they can be re-scored.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from echo_jax.agent.decoding import Decoder
from echo_jax.agent.policy import load_run, tool_call_accuracy
from echo_jax.agent.rollout import EngineConfig, EpisodeRequest, RolloutEngine, world_pool
from echo_jax.awm.capture import episode_rng
from echo_jax.awm.capture_shards import write_shard
from echo_jax.awm.rewards import FORMAT_ERROR_TYPES
from echo_jax.awm.world_format import World, load_worlds
from echo_jax.config import SPLITS, AgentConfig
from echo_jax.data import corpus
from echo_jax.data.episode_files import load_episodes
from echo_jax.util.atomic import atomic_write_text

log = logging.getLogger(__name__)

ROLLOUTS = "rollouts.jsonl.gz"
METRICS = "metrics.json"
SUCCESS = "complete"  # The verify reward_type of a solved task.
GREEDY = -1  # Sample index of the greedy episode.


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k of the n samples (c of them correct) is correct."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def split_tasks(
    worlds: dict[str, World], corpus_dir: str | None, split: str
) -> list[tuple[str, int]]:
    """(scenario, task_idx) of a corpus split among the loaded worlds; every task without one."""
    if corpus_dir is None:
        return [(name, t) for name in sorted(worlds) for t in range(len(worlds[name].tasks))]
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    manifest = corpus.read_manifest(corpus_dir)
    captured = manifest.get("counts", worlds)  # Worlds the corpus never saw belong to no split.
    return [
        (name, t)
        for name in sorted(worlds)
        if name in captured
        for t in range(len(worlds[name].tasks))
        if corpus.split_of(manifest["splits"], name, t) == split
    ]


def choose_tasks(tasks: list[tuple[str, int]], max_tasks: int | None, seed: int):
    """A fixed random subset (same seed, same tasks), in sorted order."""
    if max_tasks is None or len(tasks) <= max_tasks:
        return tasks
    keep = np.random.default_rng(seed).permutation(len(tasks))[:max_tasks]
    return sorted(tasks[i] for i in keep)


def mute_fork_warning() -> None:
    """World servers and verifiers are subprocesses that fork and at once exec, so JAX's
    warning that a fork of a multithreaded process may deadlock does not apply to them."""
    warnings.filterwarnings("ignore", "os.fork\\(\\) was called", RuntimeWarning)


def episode_seed(seed: int, scenario: str, task_idx: int, sample: int) -> int:
    """The sampling seed of one evaluation episode (capture's derivation; greedy is 0)."""
    return int(episode_rng(seed, scenario, task_idx, sample + 1).integers(2**31))


def summarize(episodes: Sequence[dict[str, Any]], samples: int) -> dict[str, float]:
    """Metrics of rollouts (each carrying agent.sample): pass@1 greedy, pass@k, steps, errors."""
    by_task: dict[tuple[str, int], list[bool]] = collections.defaultdict(list)
    greedy: dict[tuple[str, int], bool] = {}
    step_types: collections.Counter[str] = collections.Counter()
    n_steps = 0
    for ep in episodes:
        ok = ep["step_reward_types"][-1] == SUCCESS
        key = (ep["scenario"], ep["task_idx"])
        if ep["agent"]["sample"] == GREEDY:
            greedy[key] = ok
        else:
            by_task[key].append(ok)
        step_types.update(ep["step_reward_types"])
        n_steps += len(ep["steps"])
    out: dict[str, float] = {
        "tasks": len(greedy | by_task),
        "episodes": len(episodes),
        "pass@1_greedy": float(np.mean(list(greedy.values()))) if greedy else math.nan,
        "mean_steps": n_steps / len(episodes) if episodes else math.nan,
        "mean_reward": float(np.mean([ep["reward"] for ep in episodes])) if episodes else math.nan,
        "format_error_share": (
            sum(step_types[t] for t in FORMAT_ERROR_TYPES) / n_steps if n_steps else math.nan
        ),
    }
    for t in sorted(FORMAT_ERROR_TYPES):
        out[f"{t}_share"] = step_types[t] / n_steps if n_steps else math.nan
    for k in range(1, samples + 1):
        values = [pass_at_k(len(v), sum(v), k) for v in by_task.values() if len(v) >= k]
        out[f"pass@{k}"] = float(np.mean(values)) if values else math.nan
    return out


def evaluate_checkpoint(
    workdir: str,
    split: str = "heldout_tasks",
    samples: int = 4,
    *,
    worlds: str = "data/awm_worlds",
    corpus_dir: str | None = "data/corpus",
    agent: AgentConfig | None = None,
    max_tasks: int | None = None,
    scenarios: Sequence[str] | None = None,
    tool_call_positions: int | None = 64,
    seed: int = 0,
    out: str | None = None,
    step: int | None = None,
    max_len: int | None = None,
) -> dict[str, Any]:
    """Runs the checkpoint's agent on the split's tasks; returns (and writes) its metrics.

    workdir      a training run (config.json, vocab.json, checkpoints/)
    split        a corpus split (config.SPLITS) of corpus_dir; corpus_dir=None: every task
    samples      K sampled episodes per task, besides the greedy one
    agent        sampling and step limits (default AgentConfig())
    max_tasks    evaluate a fixed random subset of the tasks (seeded; for sweeps on CPU)
    scenarios    only these worlds
    tool_call_positions  cap on teacher-forced positions for tool-call accuracy on the
                 corpus's successful episodes of the chosen tasks (0: skip; needs corpus_dir)
    out          folder for rollouts.jsonl.gz and metrics.json
                 (default WORKDIR/closed_loop/<split>_step<step>)
    step         checkpoint step (default: the latest)
    max_len      tokens per cache row (default: the run's max_len); a longer one holds long
                 tool lists, at positions the model never trained on (docs/models.md)

    Metrics: pass@1_greedy, pass@1..pass@K, mean_steps, mean_reward, format_error_share and
    its parts, teacher_forced_{tool_name_acc, call_acc, parse_error_rate, positions},
    decode_tokens_per_s, and where the rollouts are.
    """
    started = time.perf_counter()
    mute_fork_warning()
    agent = agent or AgentConfig()
    if agent.temperature < 0 or not 0 < agent.top_p <= 1 or agent.max_new_tokens < 1:
        raise ValueError(f"bad sampling settings {agent}")
    if samples < 0 or agent.max_steps < 0:
        raise ValueError(f"samples={samples} and max_steps={agent.max_steps} must be >= 0")
    loaded = load_worlds(worlds, scenarios)
    tasks = choose_tasks(split_tasks(loaded, corpus_dir, split), max_tasks, seed)
    if not tasks:
        raise ValueError(f"no tasks of split {split!r} among the worlds in {worlds}")
    engine_config = EngineConfig.of(agent)
    pool = world_pool(loaded, engine_config)
    pool.prestart(scenario for scenario, _ in tasks)  # While the model loads.
    try:
        cfg, vocab, graphdef, params, ckpt_step = load_run(workdir, step)
        max_len = max_len or cfg.data.max_len
    except BaseException:
        pool.close()
        raise
    requests = [
        EpisodeRequest(
            scenario,
            task_idx,
            episode_seed(seed, scenario, task_idx, sample),
            0.0 if sample == GREEDY else agent.temperature,
            1.0 if sample == GREEDY else agent.top_p,
            tag={
                "checkpoint": os.path.abspath(workdir),
                "step": ckpt_step,
                "sample": sample,
                "seed": seed,
                "temperature": 0.0 if sample == GREEDY else agent.temperature,
                "top_p": 1.0 if sample == GREEDY else agent.top_p,
            },
        )
        for scenario, task_idx in tasks
        for sample in range(GREEDY, samples)
    ]
    engine = RolloutEngine(graphdef, params, vocab, max_len, loaded, engine_config,
                           cfg.data.canonical_json, pool)  # fmt: skip
    with engine:
        episodes = engine.run(requests)
    timing = engine.timing

    metrics: dict[str, Any] = {"split": split, "checkpoint_step": ckpt_step, "samples": samples}
    metrics.update(summarize(episodes, samples))
    if tool_call_positions != 0 and corpus_dir is not None:
        decoder = Decoder(graphdef, params, vocab, max_len, agent.max_new_tokens)
        chosen = set(tasks)
        recorded = [
            ep
            for ep in load_episodes(corpus.shard_files(corpus_dir))
            if (ep.scenario, ep.task_idx) in chosen
        ]
        metrics.update(
            {
                f"teacher_forced_{k}": v
                for k, v in tool_call_accuracy(
                    decoder,
                    recorded,
                    success_reward=cfg.eval.success_reward,
                    max_positions=tool_call_positions,
                    canonical_json=cfg.data.canonical_json,
                ).items()
            }
        )
    metrics["generated_tokens"] = timing.generated_tokens
    metrics["decode_tokens_per_s"] = timing.generated_tokens / timing.decode_s
    metrics["env_steps_per_s"] = timing.env_steps / timing.wall_s
    metrics["rollout"] = timing.as_dict()
    metrics["wall_s"] = time.perf_counter() - started

    out = out or os.path.join(workdir, "closed_loop", f"{split}_step{ckpt_step}")
    write_shard(Path(out) / ROLLOUTS, episodes)
    metrics["rollouts"] = os.path.join(out, ROLLOUTS)
    atomic_write_text(os.path.join(out, METRICS), json.dumps(metrics, indent=2, sort_keys=True))
    return metrics
