"""The on-policy experiment's outputs: results/rl.csv, RL.md and PNG curves.

Every figure is read back from the runs' metrics.jsonl (one line per iteration), so
`python -m experiments.rl_sweep --report_only` regenerates them without running anything.

Curves are functions of environment steps (tool calls made in rollouts). Seeds of an arm reach
slightly different step counts per iteration, so each seed's curve is interpolated onto a
common grid (every `GRID` steps, up to the smallest final count of the arm) before the mean and
the std over seeds are taken. "Steps to reach grpo's best" uses the seed-mean curve after a
moving average over `SMOOTH` iterations' worth of steps, since one iteration's success rate
rests on only tasks × G rollouts.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from echo_jax.reports import results
from echo_jax.train.run_dir import RunDir
from echo_jax.util.atomic import atomic_write_text

CSV_NAME = "rl.csv"
MARKDOWN_NAME = "RL.md"
GRID = 10
SMOOTH = 3
COLUMNS = (
    "arm",
    "objective",
    "lam",
    "seed",
    "iteration",
    "env_steps",
    "success_rate",
    "mean_reward",
    "format_error_share",
    "parse_share",
    "mean_steps",
    "env_ce_fresh",
    "action_ce_fresh",
    "pg_loss",
    "env_loss",
    "clip_frac",
    "kl",
    "lam_used",
    "informative_groups",
    "logp_gap_mean",
    "logp_gap_max",
    "pool_pass@1",
    "heldout_pass@1",
    "rollout_s",
    "update_s",
    "workdir",
)


def collect(run_specs: Sequence[Any]) -> list[dict[str, Any]]:
    """One row per (run, iteration) from each run's metrics.jsonl; iteration 0 is the start."""
    rows = []
    for spec in run_specs:
        for line in RunDir(spec.workdir).read_metrics():
            row = {
                "arm": spec.arm.name,
                "objective": spec.arm.objective,
                "lam": spec.arm.lam,
                "seed": spec.seed,
                "workdir": spec.workdir,
                **{k: line.get(k) for k in COLUMNS if k in line},
                "lam_used": line.get("lam"),
            }
            rows.append({k: row.get(k) for k in COLUMNS})
    return rows


def arm_label(row: dict[str, Any]) -> str:
    return f"echo λ={row['lam']:g}" if row["objective"] == "echo" else row["objective"]


def _runs(rows):
    """arm -> seed -> its rows in iteration order."""
    out: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for r in rows:
        out.setdefault(r["arm"], {}).setdefault(r["seed"], []).append(r)
    for seeds in out.values():
        for runs in seeds.values():
            runs.sort(key=lambda r: r["iteration"])
    return out


def seed_curves(rows, metric: str, arm: str, skip_start: bool = True):
    """(grid, mean, std, n_seeds) of metric against env steps for one arm."""
    curves = []
    for runs in _runs(rows).get(arm, {}).values():
        pts = [
            (r["env_steps"], r[metric])
            for r in runs
            if r[metric] is not None and not (skip_start and r["iteration"] == 0)
        ]
        if pts:
            curves.append(np.array(pts, float))
    if not curves:
        return np.array([]), np.array([]), np.array([]), 0
    lo = max(c[0, 0] for c in curves)
    hi = min(c[-1, 0] for c in curves)
    grid = np.arange(math.ceil(lo / GRID) * GRID, hi + 1, GRID, dtype=float)
    if grid.size == 0:
        grid = np.array([hi])
    vals = np.array([np.interp(grid, c[:, 0], c[:, 1]) for c in curves])
    std = vals.std(0, ddof=1) if len(curves) > 1 else np.zeros(grid.size)
    return grid, vals.mean(0), std, len(curves)


def smoothed_success(rows, arm: str) -> tuple[np.ndarray, np.ndarray]:
    """(env steps, seed-mean success rate averaged over the last SMOOTH iterations' worth of
    steps up to there); empty before the window first fills."""
    grid, mean, _, _ = seed_curves(rows, "success_rate", arm)
    if grid.size == 0:
        return grid, mean
    per_iter = _steps_per_iteration(rows, arm)
    width = min(max(int(round(SMOOTH * per_iter / GRID)), 1), grid.size)
    return grid[width - 1 :], np.convolve(mean, np.ones(width) / width, mode="valid")


def steps_to_reach(rows, arm: str, threshold: float) -> float | None:
    """Env steps at which the arm's smoothed success rate first reaches threshold."""
    grid, smooth = smoothed_success(rows, arm)
    hit = np.nonzero(smooth >= threshold - 1e-9)[0]
    return float(grid[hit[0]]) if hit.size else None


def _steps_per_iteration(rows, arm: str) -> float:
    finals = [runs[-1] for runs in _runs(rows).get(arm, {}).values()]
    return float(np.mean([r["env_steps"] / max(r["iteration"], 1) for r in finals]))


def _stat(values: Sequence[float]) -> tuple[float, float, int]:
    vals = np.array([v for v in values if v is not None], float)
    if vals.size == 0:
        return (math.nan, math.nan, 0)
    return (float(vals.mean()), float(vals.std(ddof=1)) if vals.size > 1 else 0.0, vals.size)


def _fmt(stat: tuple[float, float, int], digits: int = 3) -> str:
    mean, std, n = stat
    return "n/a" if n == 0 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def arm_summary(rows) -> list[dict[str, Any]]:
    """Per arm: success over the last SMOOTH iterations, held-out pass@1 at the start and
    the end, env CE on fresh rollouts at the first and last iteration, and steps to reach
    grpo's best smoothed success rate."""
    by_arm = _runs(rows)
    order = results.arm_order([r for r in rows if r["iteration"] == 0] or rows)
    grpo_best = None
    if "grpo" in by_arm:
        _, smooth = smoothed_success(rows, "grpo")
        grpo_best = float(smooth.max()) if smooth.size else None
    out = []
    for arm in order:
        seeds = by_arm[arm]
        first_row = next(iter(seeds.values()))[0]
        finals = [runs[-1] for runs in seeds.values()]
        trained = [[r for r in runs if r["iteration"] > 0] for runs in seeds.values()]
        held = [[r for r in runs if r["heldout_pass@1"] is not None] for runs in seeds.values()]
        reach = steps_to_reach(rows, arm, grpo_best) if grpo_best is not None else None
        out.append(
            {
                "arm": arm,
                "label": arm_label(first_row),
                "seeds": len(seeds),
                "env_steps": _stat([r["env_steps"] for r in finals]),
                "success_last": _stat(
                    [np.mean([r["success_rate"] for r in t[-SMOOTH:]]) for t in trained if t]
                ),
                "success_first": _stat([t[0]["success_rate"] for t in trained if t]),
                "pass1_start": _stat([h[0]["heldout_pass@1"] for h in held if h]),
                "pass1_end": _stat([h[-1]["heldout_pass@1"] for h in held if len(h) > 1]),
                "env_ce_first": _stat([t[0]["env_ce_fresh"] for t in trained if t]),
                "env_ce_last": _stat([t[-1]["env_ce_fresh"] for t in trained if t]),
                "format_last": _stat([t[-1]["format_error_share"] for t in trained if t]),
                "kl_mean": _stat([np.mean([r["kl"] for r in t]) for t in trained if t]),
                "reach": reach,
                "grpo_best": grpo_best,
            }
        )
    return out


def markdown(rows, commands: dict[str, str], setup: str, plots: Sequence[str]) -> str:
    summary = arm_summary(rows)
    grpo = next((s for s in summary if s["arm"] == "grpo"), None)
    lines = [
        "# On-policy GRPO vs ECHO in the local AWM worlds",
        "",
        setup,
        "",
        "Mean ± sample std over seeds. *success (last)*: training-task success rate of the "
        f"rollouts, averaged over each run's last {SMOOTH} iterations; *held-out pass@1*: greedy "
        "episodes on held-out tasks at the start checkpoint and after the last iteration; "
        "*env CE*: nats/token on ENV_OUTPUT of the iteration's fresh rollouts, before the "
        f"update; *steps to grpo's best*: env steps at which the arm's seed-mean success rate "
        f"(moving average over {SMOOTH} iterations) first reaches grpo's best such value.",
        "",
        "| arm | seeds | env steps | success (first iter) | success (last) | held-out pass@1 "
        "start → end | env CE first → last | format errors (last) | mean KL | steps to "
        "grpo's best |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        reach = "not reached" if s["reach"] is None else f"{s['reach']:.0f}"
        if grpo and s is not grpo and s["reach"] is not None and grpo["reach"]:
            reach += f" ({grpo['reach'] / s['reach']:.2f}× fewer than grpo)"
        lines.append(
            f"| {s['label']} | {s['seeds']} | {_fmt(s['env_steps'], 0)} | "
            f"{_fmt(s['success_first'])} | {_fmt(s['success_last'])} | "
            f"{_fmt(s['pass1_start'])} → {_fmt(s['pass1_end'])} | "
            f"{_fmt(s['env_ce_first'])} → {_fmt(s['env_ce_last'])} | "
            f"{_fmt(s['format_last'])} | {_fmt(s['kl_mean'], 4)} | {reach} |"
        )
    lines += ["", "## What the numbers support", "", findings(summary), ""]
    lines += ["## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    lines += ["", "## Commands", "", "Each run (rerun one by deleting its workdir):", ""]
    lines += [f"- `{name}`: `{cmd}`" for name, cmd in commands.items()]
    return "\n".join(lines) + "\n"


def findings(summary) -> str:
    """Plain statements: each arm's change over the run, and each arm against grpo, with the
    seed spread; nothing is called a difference unless it exceeds twice its standard error."""
    out = []
    for s in summary:
        diff, se, clear = results.compare(s["success_last"], s["success_first"])
        if s["success_last"][2] >= 2:
            trend = "rose" if diff > 0 else "fell"
            out.append(
                f"- {s['label']}: training success {trend} from {s['success_first'][0]:.3f} "
                f"(first iteration) to {s['success_last'][0]:.3f} (last {SMOOTH}), "
                f"{diff:+.3f} ± {se:.3f}: "
                + ("beyond the seed spread." if clear else "within the seed spread.")
            )
    grpo = next((s for s in summary if s["arm"] == "grpo"), None)
    if grpo is None:
        return "\n".join(out) or "No grpo arm to compare against."
    for s in summary:
        if s is grpo:
            continue
        for key, what in (
            ("success_last", "late training success"),
            ("pass1_end", "held-out pass@1"),
            ("env_ce_last", "env CE on the last fresh rollouts (lower is better)"),
        ):
            a, b = s[key], grpo[key]
            if a[2] < 2 or b[2] < 2:
                continue
            diff, se, clear = results.compare(a, b)
            verdict = (
                "a difference larger than twice its standard error"
                if clear
                else "within the seed spread (no claim)"
            )
            out.append(f"- {s['label']} vs grpo, {what}: {diff:+.3f} (s.e. {se:.3f}): {verdict}.")
    reached = [s for s in summary if s is not grpo and s["reach"] is not None]
    if grpo["reach"] is not None:
        out.append(
            f"- grpo's best smoothed success rate was {grpo['grpo_best']:.3f}, at "
            f"{grpo['reach']:.0f} env steps; {len(reached)} of {len(summary) - 1} other arms "
            "reached it. A best value of a noisy curve favours the arm it was taken from, so "
            "this count only means something when the curves rise clearly above their start."
        )
    return "\n".join(out)


def plot(rows, out_dir: str) -> list[str]:
    plt = results.pyplot()
    colors = results.arm_colors([r for r in rows if r["iteration"] == 0] or rows)
    paths = []
    panels = (
        ("success_rate", "training-task success rate", "rl_success.png", True),
        ("heldout_pass@1", "held-out pass@1 (greedy)", "rl_heldout_pass1.png", False),
        ("env_ce_fresh", "env CE on fresh rollouts (nats/token)", "rl_env_ce.png", True),
    )
    for metric, ylabel, name, skip_start in panels:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        drawn = False
        for arm in results.arm_order([r for r in rows if r["iteration"] == 0] or rows):
            if metric == "heldout_pass@1":
                grid, mean, std, n = _points(rows, arm)
            else:
                grid, mean, std, n = seed_curves(rows, metric, arm, skip_start)
            if grid.size == 0:
                continue
            row = next(r for r in rows if r["arm"] == arm)
            label = f"{arm_label(row)} ({n} seeds)"
            ax.plot(
                grid, mean, marker="o" if grid.size < 8 else None, color=colors[arm], label=label
            )
            ax.fill_between(grid, mean - std, mean + std, color=colors[arm], alpha=0.15)
            drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xlabel("environment steps (tool calls in rollouts)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(results.save_png(fig, os.path.join(out_dir, name)))
        plt.close(fig)
    return paths


def _points(rows, arm: str):
    """Held-out pass@1 is measured at a few iterations only: mean ± std at each, placed at
    the seeds' mean env steps there."""
    by_iter: dict[int, list[tuple[float, float]]] = {}
    for r in rows:
        if r["arm"] == arm and r["heldout_pass@1"] is not None:
            by_iter.setdefault(r["iteration"], []).append((r["env_steps"], r["heldout_pass@1"]))
    if not by_iter:
        return np.array([]), np.array([]), np.array([]), 0
    its = sorted(by_iter)
    x = np.array([np.mean([p[0] for p in by_iter[i]]) for i in its])
    ys = [np.array([p[1] for p in by_iter[i]]) for i in its]
    mean = np.array([y.mean() for y in ys])
    std = np.array([y.std(ddof=1) if y.size > 1 else 0.0 for y in ys])
    return x, mean, std, max(y.size for y in ys)


def write(rows, out_dir: str, commands: dict[str, str], setup: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, CSV_NAME)
    results.write_csv_columns(rows, csv_path, COLUMNS)
    plots = plot(rows, out_dir)
    md_path = os.path.join(out_dir, MARKDOWN_NAME)
    atomic_write_text(md_path, markdown(rows, commands, setup, plots))
    return [csv_path, md_path, *plots]
