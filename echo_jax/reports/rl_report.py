"""The on-policy grids' report: results/RL.md, results/rl_summary.json and the plots, read from
the runs' committed small files alone, so `python -m experiments.rl_sweep --report_only`
rewrites them byte for byte in a fresh clone.

A grid is a folder `results/rl/<grid>/` with `grid.json` (what ran, where, with which arms)
and one folder per finished run, `<arm>_seed<s>/` (metrics.jsonl, pool.json, config files,
summary.json). The sparse-reward grids come first, then the saturated one. Every endpoint is one
number per run over the grid's common budget of iterations, compared with grpo seed by seed
(`echo_jax.reports.rl_stats`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from echo_jax.reports import results, rl_stats
from echo_jax.util.atomic import atomic_write_text
from echo_jax.util.jsonl import read_jsonl

GRID_FILE = "grid.json"
MARKDOWN_NAME = "RL.md"
SUMMARY_NAME = "rl_summary.json"
RUN_FILES = ("config.json", "rl_config.json", "pool.json", "metrics.jsonl", "summary.json")
REGIMES = ("sparse", "saturated")  # Report order.
HALF = 0.5  # The success of the "rollouts to 0.5" endpoint.
LAST = 3  # Iterations of the "last iterations" means.

# Endpoints: key, label, whether higher is better. PRIMARY is the grid's fixed endpoint; the
# secondary ones form one Holm family per arm (those a grid has values for).
PRIMARY = ("mean_success", "mean pool success over all iterations", True)
SECONDARY = (
    (
        "first_success_zero",
        "iteration of a zero task's first success (censored: budget + 1)",
        False,
    ),
    (
        "rollouts_to_half",
        f"rollouts to {HALF:g} pool success (censored: budget + 1 iteration)",
        False,
    ),
    ("heldout_pass_end", "held-out greedy pass@1 at the end", True),
    ("heldout_env_ce_end", "held-out-tasks env CE at the end (teacher-forced)", False),
)
WORLD = (
    ("env_ce_fresh_last", f"env CE of fresh rollouts, last {LAST} iterations", False),
    ("heldout_env_ce_end", "held-out tasks env CE, end", False),
    ("heldout_scenarios_env_ce_end", "held-out scenarios env CE, end", False),
)
DESCRIBE = ("all_fail_share", "all_success_share", "grad_norm_pg", "grad_norm_env", "grad_cos")


def read_grid(folder: str) -> dict[str, Any]:
    """grid.json and, per run folder, its metrics lines, pool and run name parts."""
    with open(os.path.join(folder, GRID_FILE), encoding="utf-8") as f:
        grid = json.load(f)
    runs = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name, "metrics.jsonl")
        if not os.path.isfile(path):
            continue
        arm, _, seed = name.rpartition("_seed")
        if arm not in grid["arms"]:
            raise ValueError(f"{folder}/{name}: arm {arm!r} is not one of grid.json's arms")
        pool_path = os.path.join(folder, name, "pool.json")
        pool = grid.get("pool", {})
        if os.path.isfile(pool_path):
            with open(pool_path, encoding="utf-8") as f:
                pool = json.load(f)
        runs.append({"arm": arm, "seed": int(seed), "lines": read_jsonl(path), "pool": pool})
    return grid | {"runs": runs, "folder": folder}


def budget(runs: Sequence[dict[str, Any]]) -> int:
    """The iterations every run finished: the common budget the arms are compared at."""
    return min(max(m["iteration"] for m in r["lines"]) for r in runs)


def _at(lines, iteration: int, key: str):
    for m in lines:
        if m["iteration"] == iteration and m.get(key) is not None:
            return m[key]
    return None


def run_endpoints(run: dict[str, Any], n: int) -> dict[str, float | None]:
    """Every endpoint of one run over iterations 1..n (None where the run has no value)."""
    its = sorted((m for m in run["lines"] if 0 < m["iteration"] <= n), key=lambda m: m["iteration"])
    success = np.array([m["success_rate"] for m in its], float)
    rollouts = np.cumsum([m["rollouts"] for m in its])
    half = rl_stats.first_hit(success, HALF, censored=n + 1)
    out: dict[str, float | None] = {
        "mean_success": float(success.mean()),
        "success_first": float(success[0]),
        "success_last": float(success[-LAST:].mean()),
        "rollouts_to_half": float(
            rollouts[int(half) - 1] if half <= n else rollouts[-1] + rollouts[-1] / n
        ),
        "env_ce_fresh_last": _mean(m.get("env_ce_fresh") for m in its[-LAST:]),
        "heldout_pass_start": _at(run["lines"], 0, "heldout_pass@1"),
        "heldout_pass_end": _at(run["lines"], n, "heldout_pass@1"),
        "heldout_env_ce_start": _at(run["lines"], 0, "tf_heldout_tasks/env_ce"),
        "heldout_env_ce_end": _at(run["lines"], n, "tf_heldout_tasks/env_ce"),
        "heldout_scenarios_env_ce_end": _at(run["lines"], n, "tf_heldout_scenarios/env_ce"),
        "heldout_action_ce_end": _at(run["lines"], n, "tf_heldout_tasks/action_ce"),
        "all_fail_share": _mean(m.get("all_fail_groups") for m in its),
        "all_success_share": _mean(m.get("all_success_groups") for m in its),
        "grad_norm_pg": _mean(m.get("grad_norm_pg") for m in its),
        "grad_norm_env": _mean(m.get("grad_norm_env") for m in its),
        "grad_cos": _mean(m.get("grad_cos") for m in its),
        "logp_gap_mean_max": max(
            (m["logp_gap_mean"] for m in its if _finite(m.get("logp_gap_mean"))), default=None
        ),
    }
    zero = [k for k, b in run["pool"].get("bands", {}).items() if b == "zero"]
    if zero and all("task_successes" in m for m in its):
        firsts = [
            rl_stats.first_hit([m["task_successes"].get(k, 0) for m in its], 1, n + 1) for k in zero
        ]
        out["first_success_zero"] = float(np.mean(firsts))
        out["zero_tasks_solved"] = float(np.mean([f <= n for f in firsts]))
    else:
        out["first_success_zero"] = out["zero_tasks_solved"] = None
    return out


def _finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def _mean(values) -> float | None:
    vals = [v for v in values if _finite(v)]
    return float(np.mean(vals)) if vals else None


def arm_order(grid: dict[str, Any]) -> list[str]:
    """The arms with runs: grpo, then the primary arms, then the secondary ones, by name."""
    ran = {r["arm"] for r in grid["runs"]}
    rank = {"primary": 1, "secondary": 2}
    arms = grid["arms"]
    return sorted(ran, key=lambda a: (a != rl_stats.BASELINE, rank.get(arms[a].get("role"), 3), a))


def grid_summary(grid: dict[str, Any]) -> dict[str, Any]:
    """rl_summary.json's entry of one grid: per arm its seeds, endpoints with intervals, and the
    paired comparisons with grpo (primary; secondary Holm-corrected; the world model)."""
    runs, n = grid["runs"], budget(grid["runs"])
    per_run = {(r["arm"], r["seed"]): run_endpoints(r, n) for r in runs}
    arms = arm_order(grid)

    def values(arm: str, key: str) -> dict[int, float]:
        return {s: v[key] for (a, s), v in per_run.items() if a == arm and v[key] is not None}

    out_arms = {}
    for arm in arms:
        seeds = sorted(s for a, s in per_run if a == arm)
        entry: dict[str, Any] = {
            "label": grid["arms"][arm]["label"],
            "role": grid["arms"][arm].get("role", ""),
            "seeds": seeds,
        }
        keys = {k for (_, s), v in per_run.items() for k in v}
        entry["endpoints"] = {k: _interval(list(values(arm, k).values())) for k in sorted(keys)}
        entry["per_seed"] = {k: values(arm, k) for k in (PRIMARY[0], "heldout_env_ce_end")}
        if arm != rl_stats.BASELINE and rl_stats.BASELINE in arms:
            base = rl_stats.BASELINE
            primary = rl_stats.endpoint(values(arm, PRIMARY[0]), values(base, PRIMARY[0]))
            primary["verdict"] = rl_stats.verdict(primary, PRIMARY[2])
            secondary = {
                k: rl_stats.endpoint(values(arm, k), values(base, k))
                for k, _, _ in SECONDARY
                if values(arm, k)
            }
            adjusted = rl_stats.holm({k: v["p_value"] for k, v in secondary.items()})
            for k, _, better in SECONDARY:
                if k in secondary:
                    secondary[k]["p_holm"] = adjusted[k]
                    secondary[k]["verdict"] = rl_stats.verdict(secondary[k], better, "p_holm")
            world = {
                k: rl_stats.endpoint(values(arm, k), values(base, k))
                for k, _, _ in WORLD
                if values(arm, k)
            }
            for k, _, better in WORLD:
                if k in world:
                    world[k]["verdict"] = rl_stats.verdict(world[k], better)
            entry |= {
                "primary_vs_grpo": primary,
                "secondary_vs_grpo": secondary,
                "world_model_vs_grpo": world,
            }
        out_arms[arm] = entry
    heldout = {json.dumps(r["pool"].get("heldout")) for r in runs if "heldout" in r["pool"]}
    return {
        "regime": grid["regime"],
        "title": grid["title"],
        "budget_iterations": n,
        "pool": grid.get("pool", {}).get("tasks"),
        "pool_bands": grid.get("pool", {}).get("bands"),
        "heldout_tasks": json.loads(heldout.pop()) if len(heldout) == 1 else None,
        "heldout_tasks_identical_across_runs": len(heldout) <= 1,
        "arms": out_arms,
    }


def _interval(vals: Sequence[float]) -> dict[str, Any] | None:
    if not vals:
        return None
    mean, lo, hi = rl_stats.mean_ci(vals)
    return {"mean": mean, "ci95": [lo, hi], "n": len(vals)}


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
        "### How the terms pull, and how much signal the groups carry",
        "",
        "| arm | all-fail groups | all-success groups | \\|∇L_pg\\| | \\|∇(λ·L_env)\\| | "
        "cos(∇L_pg, ∇L_env) | max logp_gap_mean |",
        "|---|---|---|---|---|---|---|",
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
            parts.append(f"{a['label']} {c['verdict']} on mean pool success ({_diff(c)})")
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
