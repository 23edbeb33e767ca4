"""The on-policy experiment's outputs: results/rl.csv, RL.md, rl_summary.json and PNG plots.

Every figure is read back from the runs' metrics.jsonl (one line per iteration), so
`python -m experiments.rl_sweep --report_only` regenerates them without running anything.
The statistics (steps to a success threshold, their ratio to grpo with bootstrap intervals,
area under the success curve) are in `echo_jax.reports.rl_stats`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from echo_jax.reports import results, rl_stats
from echo_jax.train.run_dir import RunDir
from echo_jax.util.atomic import atomic_write_text

CSV_NAME = "rl.csv"
MARKDOWN_NAME = "RL.md"
SUMMARY_NAME = "rl_summary.json"
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


def budget(rows: Sequence[dict[str, Any]]) -> int:
    """The iterations every run finished: the common budget the arms are compared at (a run
    cut there is the same as a run of that many iterations, its rollouts being seeded by
    iteration)."""
    last: dict[tuple[str, int], int] = {}
    for r in rows:
        key = (r["arm"], r["seed"])
        last[key] = max(last.get(key, 0), r["iteration"])
    return min(last.values())


def curves(rows: Sequence[dict[str, Any]]) -> dict[str, list[rl_stats.Curve]]:
    """arm -> one Curve per seed over the common budget, in the report's arm and seed order."""
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for r in rows:
        runs.setdefault(r["arm"], {}).setdefault(r["seed"], []).append(r)
    n = budget(rows)
    out = {}
    for arm in results.arm_order(rows):
        out[arm] = []
        for seed in sorted(runs[arm]):
            its = sorted((r for r in runs[arm][seed] if 0 < r["iteration"] <= n),
                         key=lambda r: r["iteration"])  # fmt: skip
            if not its:
                continue
            held = [r["heldout_pass@1"] for r in its if r["heldout_pass@1"] is not None]
            out[arm].append(rl_stats.Curve(
                np.array([r["env_steps"] for r in its], float),
                np.array([r["success_rate"] for r in its], float),
                held[-1] if held else None,
            ))  # fmt: skip
    return {arm: c for arm, c in out.items() if c}


def summary(rows, threshold: float, window: int) -> dict[str, dict[str, Any]]:
    """rl_summary.json: per arm, the issue's fields, and the threshold they refer to."""
    by_arm = curves(rows)
    seeds = {arm: sorted({r["seed"] for r in rows if r["arm"] == arm}) for arm in by_arm}
    paired = len({tuple(v) for v in seeds.values()}) == 1  # Every arm ran the same seeds.
    out = rl_stats.summarize(by_arm, threshold, window, paired=paired)
    for arm, s in out.items():
        gaps = [r["logp_gap_mean"] for r in rows if r["arm"] == arm and r["logp_gap_mean"]]
        s["threshold"] = {"success": threshold, "moving_average_iterations": window}
        s["seed_ids"] = seeds[arm]
        s["bootstrap"] = "paired over seeds" if paired else "each arm resampled apart"
        s["logp_gap_mean_max"] = max(gaps) if gaps else None
    return out


def _ci(stat) -> str:
    if stat is None or math.isnan(stat[0]):
        return "n/a"
    mean, lo, hi = stat
    return f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


def _steps(v) -> str:
    return "never" if v is None else f"{v:.0f}"


def _ratio(r) -> str:
    if r is None:
        return "n/a"
    lo, hi = (("∞" if x is None else f"{x:.2f}") for x in r["ci95"])
    mid = "∞" if r["median"] is None else f"{r['median']:.2f}"
    return f"{mid} [{lo}, {hi}]"


def threshold_table(s: dict[str, dict[str, Any]], labels, threshold: float) -> list[str]:
    lines = [
        f"| arm | seeds | env steps to {threshold:g} (per seed) | median | ratio to grpo "
        "[95% CI] | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for arm, a in s.items():
        per_seed = ", ".join(_steps(v) for v in a["steps_to_threshold"])
        med_text = _steps(a["median_steps_to_threshold"])
        r = a["ratio_to_grpo"]
        word = "baseline" if arm == rl_stats.BASELINE else (rl_stats.verdict(r) if r else "n/a")
        lines.append(f"| {labels[arm]} | {a['seeds']} | {per_seed} | {med_text} | {_ratio(r)} | "
                     f"{word} |")  # fmt: skip
    return lines


def markdown(rows, commands: dict[str, str], setup: str, plots: Sequence[str],
             summaries: dict[float, dict[str, dict[str, Any]]], window: int) -> str:  # fmt: skip
    """RL.md; summaries: `summary` at each threshold, the first the main one."""
    labels = {r["arm"]: arm_label(r) for r in rows}
    first = next(iter(summaries))
    main = summaries[first]
    lines = [
        "# Does ECHO reach a success rate in fewer environment steps than GRPO?",
        "",
        setup,
        "",
        f"Every arm is compared over the first {budget(rows)} iterations of its runs.",
        "",
        "*Environment steps*: tool calls made in rollouts, cumulated over iterations. *Success*: "
        "the share of an iteration's rollouts on the pool that the verifier passed. A run "
        f"*reaches* a threshold at the end of the first iteration whose success, averaged over "
        f"it and the {window - 1} before it, is at least the threshold. *Ratio to grpo*: the "
        "arm's median steps-to-threshold over grpo's (below 1: fewer steps); a seed that never "
        "reaches it counts as infinitely many steps. Intervals: 95% percentile bootstrap over "
        "seeds; where every arm ran the same seeds they are resampled jointly (seed s of every "
        "arm draws the same sampling keys, so its first rollouts are the same in every arm), "
        "otherwise each arm on its own. *Verdict*: faster or slower when the whole interval "
        "lies below or above 1, otherwise not separable. In rl_summary.json a null step count "
        "means never, and a null ratio or bound means infinite.",
        "",
        "| arm | seeds | success first → last 3 | area under success [95% CI] | held-out "
        "pass@1 at the end [95% CI] | max logp_gap_mean |",
        "|---|---|---|---|---|---|",
    ]
    for arm, a in main.items():
        gap = "n/a" if a["logp_gap_mean_max"] is None else f"{a['logp_gap_mean_max']:.1e}"
        lines.append(
            f"| {labels[arm]} | {a['seeds']} | {a['success_first']:.3f} → "
            f"{a['success_last']:.3f} | {_ci(a['auc'])} | {_ci(a['heldout_pass@1_end'])} | "
            f"{gap} |"
        )
    for threshold, s in summaries.items():
        lines += ["", f"## Steps to {threshold:g} success ({window}-iteration moving average)",
                  ""] + threshold_table(s, labels, threshold)  # fmt: skip
    lines += ["", "## Verdict", "", findings(main, labels, first), ""]
    lines += ["## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    lines += ["", "## Commands", "", "Each run (rerun one by deleting its workdir):", ""]
    lines += [f"- `{name}`: `{cmd}`" for name, cmd in commands.items()]
    return "\n".join(lines) + "\n"


def findings(s: dict[str, dict[str, Any]], labels: dict[str, str], threshold: float) -> str:
    """One plain sentence per arm against grpo at the main threshold."""
    base = s.get(rl_stats.BASELINE)
    if base is None:
        return "No grpo arm to compare against."
    reached = sum(v is not None for v in base["steps_to_threshold"])
    out = [f"- grpo: success {base['success_first']:.3f} → {base['success_last']:.3f}; "
           f"{reached} of {base['seeds']} seeds reach {threshold:g}."]  # fmt: skip
    for arm, a in s.items():
        if arm == rl_stats.BASELINE or a["ratio_to_grpo"] is None:
            continue
        word = rl_stats.verdict(a["ratio_to_grpo"])
        against = "from" if word.startswith("not separable") else "than"
        out.append(f"- {labels[arm]}: {word} {against} grpo at this budget (ratio of median "
                   f"steps to {threshold:g}: {_ratio(a['ratio_to_grpo'])}).")  # fmt: skip
    ratios = {arm: a["ratio_to_grpo"] for arm, a in s.items() if a["ratio_to_grpo"]}
    faster = [labels[arm] for arm, r in ratios.items() if rl_stats.verdict(r) == "faster"]
    out.append(
        f"- In short: {', '.join(faster)} reached {threshold:g} in fewer environment steps than "
        "grpo, beyond the seeds' spread." if faster else
        f"- In short: no arm reached {threshold:g} in fewer environment steps than grpo beyond "
        "the seeds' spread at this budget."
    )  # fmt: skip
    return "\n".join(out)


def plot(rows, out_dir: str, s: dict[str, dict[str, Any]], threshold: float) -> list[str]:
    """The success band per arm, and each seed's steps to `threshold` (`s`, its summary)."""
    plt = results.pyplot()
    colors = results.arm_colors([r for r in rows if r["iteration"] == 0] or rows)
    labels = {r["arm"]: arm_label(r) for r in rows}
    by_arm = curves(rows)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for arm, cs in by_arm.items():
        x, mean, lo, hi = rl_stats.band(cs)
        ax.plot(x, mean, color=colors[arm], label=f"{labels[arm]} ({len(cs)} seeds)")
        ax.fill_between(x, lo, hi, color=colors[arm], alpha=0.15)
    ax.axhline(threshold, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("environment steps (tool calls in rollouts)")
    ax.set_ylabel("pool success rate (mean, 95% band over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths = [results.save_png(fig, os.path.join(out_dir, "rl_success.png"))]
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.6))
    never = 1.05 * max(max(a["env_steps_final"]) for a in s.values())  # Where "never" is drawn.
    for i, (arm, a) in enumerate(s.items()):
        vals = [never if v is None else v for v in a["steps_to_threshold"]]
        jitter = np.linspace(-0.15, 0.15, len(vals))
        ax.scatter(vals, i + jitter, color=colors[arm], s=25)
    ax.axvline(never, color="grey", lw=0.8, ls=":")
    ax.set_yticks(range(len(s)), [labels[a] for a in s])
    ax.set_xlabel(f"environment steps to {threshold:g} success (right of the line: never)")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    paths.append(results.save_png(fig, os.path.join(out_dir, "rl_steps_to_threshold.png")))
    plt.close(fig)
    return paths


def write(rows, out_dir: str, commands: dict[str, str], setup: str,
          thresholds: Sequence[float] = (0.8, 0.6), window: int = 3) -> list[str]:  # fmt: skip
    """rl.csv, rl_summary.json (at thresholds[0]), RL.md and the plots."""
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, CSV_NAME)
    results.write_csv_columns(rows, csv_path, COLUMNS)
    summaries = {t: summary(rows, t, window) for t in thresholds}
    main = summaries[thresholds[0]]
    json_path = os.path.join(out_dir, SUMMARY_NAME)
    atomic_write_text(json_path, json.dumps(main, indent=2) + "\n")
    plots = plot(rows, out_dir, main, thresholds[0])
    md_path = os.path.join(out_dir, MARKDOWN_NAME)
    atomic_write_text(md_path, markdown(rows, commands, setup, plots, summaries, window))
    return [csv_path, json_path, md_path, *plots]
