"""results/RL.md, rl_summary.json and one plot per grid, from the grids' committed files alone
(`rl_report` reads them and computes every endpoint): `python -m experiments.rl_sweep
--report_only` rewrites them byte for byte in a fresh clone."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from echo_jax.reports import results, rl_stats
from echo_jax.reports.rl_report import (
    DESCRIBE,
    LAST,
    MARKDOWN_NAME,
    REGIMES,
    SECONDARY,
    SUMMARY_NAME,
    WORLD,
    arm_order,
    budget,
    grid_summary,
    read_grid,
)
from echo_jax.util.atomic import atomic_write_text


def _num(x, fmt: str = ".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _ci(e: dict | None, fmt: str = ".3f") -> str:
    if not e:
        return "n/a"
    return f"{_num(e['mean'], fmt)} [{_num(e['ci95'][0], fmt)}, {_num(e['ci95'][1], fmt)}]"


def _diff(c: dict | None, fmt: str = "+.3f", p_key: str = "p_value") -> str:
    if not c or not c["seeds"]:
        return "n/a"
    lo, hi = c["ci95"]
    return (
        f"{_num(c['mean_diff'], fmt)} [{_num(lo, fmt)}, {_num(hi, fmt)}], "
        f"p = {_num(c[p_key], '.3f')} ({c['seeds']} pairs)"
    )


def grid_markdown(s: dict[str, Any], grid: dict[str, Any], plot: str) -> list[str]:
    arms = s["arms"]
    lines = [
        f"## {s['title']}",
        "",
        grid["setup"],
        "",
        f"Compared over the first {s['budget_iterations']} iterations of every run.",
        "",
    ]
    if grid.get("notes"):
        lines += [grid["notes"], ""]
    lines += [
        "### Primary endpoint: mean pool success over all iterations, arm − grpo per seed",
        "",
        "| arm | seeds | success first → last 3 | mean success [95% CI] | arm − grpo [95% CI], "
        "exact p | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for a in arms.values():
        e, c = a["endpoints"], a.get("primary_vs_grpo")
        lines.append(
            f"| {a['label']} | {len(a['seeds'])} | {_num(e['success_first']['mean'])} → "
            f"{_num(e['success_last']['mean'])} | {_ci(e['mean_success'])} | "
            f"{_diff(c) if c else 'baseline'} | {c['verdict'] if c else ''} |"
        )
    lines += [
        "",
        "### The world model",
        "",
        "| arm | " + " | ".join(label for _, label, _ in WORLD) + " | env CE of fresh "
        "rollouts, arm − grpo |",
        "|---|" + "---|" * (len(WORLD) + 1),
    ]
    for a in arms.values():
        e, w = a["endpoints"], a.get("world_model_vs_grpo", {})
        cells = [_ci(e.get(k)) for k, _, _ in WORLD]
        lines.append(
            f"| {a['label']} | " + " | ".join(cells) + " | "
            f"{_diff(w.get('env_ce_fresh_last')) if w else 'baseline'} |"
        )
    keys = [
        k
        for k, _, _ in SECONDARY
        if any(k in a.get("secondary_vs_grpo", {}) for a in arms.values())
    ]
    if keys:
        lines += [
            "",
            "### Secondary endpoints, arm − grpo (Holm-corrected within each arm)",
            "",
            "| arm | endpoint | arm mean [95% CI] | arm − grpo [95% CI], Holm p | verdict |",
            "|---|---|---|---|---|",
        ]
        labels = {k: label for k, label, _ in SECONDARY}
        for arm, a in arms.items():
            for k in keys:
                c = a.get("secondary_vs_grpo", {}).get(k)
                if c is None and arm != rl_stats.BASELINE:
                    continue
                lines.append(
                    f"| {a['label']} | {labels[k]} | {_ci(a['endpoints'].get(k))} | "
                    f"{_diff(c, p_key='p_holm') if c else 'baseline'} | "
                    f"{c['verdict'] if c else ''} |"
                )
    lines += [
        "",
        "### How the terms pull, how much signal the groups carry, and how the calls fail",
        "",
        f"| arm | all-fail groups | all-success groups | steps that were format errors, last "
        f"{LAST} iterations | action CE of its own calls, last {LAST} iterations | "
        "\\|∇L_pg\\| | \\|∇(λ·L_env)\\| | cos(∇L_pg, ∇L_env) | max logp_gap_mean |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for a in arms.values():
        e = a["endpoints"]
        cells = [_ci(e.get(k), ".3g") for k in DESCRIBE]
        gap = e.get("logp_gap_mean_max")
        lines.append(
            f"| {a['label']} | " + " | ".join(cells) + " | "
            f"{_num(gap['ci95'][1] if gap else None, '.1e')} |"
        )
    lines += ["", f"![{os.path.basename(plot)}]({os.path.basename(plot)})", ""]
    lines += [
        "Runs (`" + grid["folder_name"] + "/<run>/` holds each one's config, pool and metrics):",
        "",
        f"    {grid['command']}",
        "",
    ]
    return lines


def verdict_line(s: dict[str, Any]) -> str:
    """The opening of a grid: the primary endpoint of each arm against grpo, then the world
    model (env CE of fresh rollouts)."""
    parts, world = [], []
    for a in s["arms"].values():
        c = a.get("primary_vs_grpo")
        if c:
            parts.append(f"{a['label']}: {c['verdict']} on mean pool success ({_diff(c)})")
        w = a.get("world_model_vs_grpo", {}).get("env_ce_fresh_last")
        if w:
            world.append(f"{a['label']} {_diff(w)}")
    if not parts:
        return "no arm has runs to compare with grpo yet."
    out = "; ".join(parts) + "."
    if world:
        out += " World model, env CE of fresh rollouts over the last iterations, arm − grpo: "
        out += "; ".join(world) + "."
    return out


def plot_grid(grid: dict[str, Any], out_path: str) -> str:
    """Pool success against rollouts, mean and 95% band over seeds, per arm."""
    plt = results.pyplot()
    n = budget(grid["runs"])
    fig, ax = plt.subplots(figsize=(7, 4.2))
    cmap = plt.get_cmap("tab10")
    for i, arm in enumerate(arm_order(grid)):
        curves = []
        for r in sorted((r for r in grid["runs"] if r["arm"] == arm), key=lambda r: r["seed"]):
            its = sorted(
                (m for m in r["lines"] if 0 < m["iteration"] <= n), key=lambda m: m["iteration"]
            )
            curves.append(
                rl_stats.Curve(
                    np.cumsum([m["rollouts"] for m in its]).astype(float),
                    np.array([m["success_rate"] for m in its], float),
                )
            )
        x, mean, lo, hi = rl_stats.band(curves)
        color = "black" if arm == rl_stats.BASELINE else cmap(i % 10)
        ax.plot(x, mean, color=color, label=f"{grid['arms'][arm]['label']} ({len(curves)} seeds)")
        ax.fill_between(x, lo, hi, color=color, alpha=0.15)
    ax.set_xlabel("rollouts")
    ax.set_ylabel("pool success rate (mean, 95% band over seeds)")
    ax.set_title(grid["title"], fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = results.save_png(fig, out_path)
    plt.close(fig)
    return path


def protocol() -> list[str]:
    return [
        "## Protocol",
        "",
        "Every endpoint is one number per run over the grid's common budget of iterations; "
        "seed s of every arm draws the same sampling keys, so each arm is compared with grpo "
        "seed by seed. The primary endpoint, fixed before the sparse grid ran, is the mean over "
        "iterations of pool success; its effect is the mean over seeds of (arm − grpo), with an "
        "exact sign-flip permutation test (all 2^n sign patterns of the n paired differences) "
        "and a 95% percentile-bootstrap interval of the mean difference. A verdict says *helps* "
        f"or *hurts* when p < {rl_stats.ALPHA:g} and the interval excludes 0, otherwise *not "
        "separable*. The secondary endpoints are tested the same way and Holm-corrected "
        "together within each arm. Censored values (a zero task never solved, 0.5 never "
        "reached) count as one past the budget, which the permutation test allows. The world "
        "model is read on the env tokens of the iteration's own fresh rollouts (before the "
        "update) and, teacher-forced, on fixed subsamples of the corpus's held-out splits. "
        "With n pairs the smallest exact two-sided p is 2/2^n: 0.0625 at 5 seeds, which is "
        "why no 5-seed comparison can pass 0.05 and the sparse grid's primary pair runs 8.",
        "",
    ]


def write(grid_folders: Sequence[str], out_dir: str) -> list[str]:
    """RL.md, rl_summary.json and one plot per grid with runs, from the grids' files alone."""
    grids = [read_grid(f) | {"folder_name": os.path.relpath(f, out_dir)} for f in grid_folders]
    grids.sort(key=lambda g: (REGIMES.index(g["regime"]), g["name"]))
    summaries, body, paths = {}, [], []
    opening = ["# ECHO against GRPO in on-policy RL", ""]
    for g in grids:
        if not g["runs"]:
            opening.append(f"- **{g['title']}**: no finished runs yet.")
            continue
        s = grid_summary(g)
        summaries[g["name"]] = s
        plot = plot_grid(g, os.path.join(out_dir, f"rl_{g['name']}_success.png"))
        paths.append(plot)
        opening.append(f"- **{g['title']}**: {verdict_line(s)}")
        body += grid_markdown(s, g, plot)
    md = "\n".join([*opening, "", *body, *protocol()]) + "\n"
    os.makedirs(out_dir, exist_ok=True)
    md_path, json_path = (os.path.join(out_dir, n) for n in (MARKDOWN_NAME, SUMMARY_NAME))
    atomic_write_text(json_path, json.dumps(summaries, indent=1, sort_keys=True) + "\n")
    atomic_write_text(md_path, md)
    return [md_path, json_path, *paths]
