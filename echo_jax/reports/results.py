"""The ablation's outputs: results/ablation.csv, ABLATION.md, README_results.md and PNG plots.

Everything here reads the CSV rows (plus each run's metrics.jsonl / eval.jsonl for the curves),
so `python -m experiments.sweep --report_only` regenerates every file without training.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from echo_jax.config import EVAL_SPLITS
from echo_jax.train import evaluation
from echo_jax.train.run_dir import RunDir
from echo_jax.util.atomic import atomic_open, atomic_write_text

CSV_NAME = "ablation.csv"
MARKDOWN_NAME = "ABLATION.md"
README_NAME = "README_results.md"
META_NAME = "ablation.json"  # The sweep's command and grid, written next to the CSV.
HELDOUT = ("heldout_tasks", "heldout_scenarios", "real")

COLUMNS = (
    "arm",
    "objective",
    "lam",
    "seed",
    "steps",
    "status",
    "trained_steps",
    "final_train_loss",
    "final_train_env_ce",
    "final_train_action_ce",
    "eval_step",
    *(f"{s}/{m}" for s in EVAL_SPLITS for m in evaluation.METRICS),
    "pass@1",
    "pass@k",
    "k",
    "tool_call_acc",
    "tool_name_acc",
    "format_error_share",
    "closed_loop_steps",
    "wall_s",
    "git_commit",
    "workdir",
)
_INTS = ("seed", "steps", "trained_steps", "eval_step", "k")
_STRS = ("arm", "objective", "status", "git_commit", "workdir")


# ----------------------------------------------------------------------------- CSV


def write_csv(rows: Sequence[dict[str, Any]], path: str) -> None:
    """One row per run; None/NaN become empty cells."""
    write_csv_columns(rows, path, COLUMNS)


def write_csv_columns(rows: Sequence[dict[str, Any]], path: str, columns: Sequence[str]) -> None:
    with atomic_open(path, "w") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for row in rows:
            w.writerow({k: _cell(row.get(k)) for k in columns})


def _cell(v: Any) -> Any:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.6g}" if isinstance(v, float) else v


def read_csv(path: str) -> list[dict[str, Any]]:
    with open(path, newline="") as f:
        return [_parse_row(r) for r in csv.DictReader(f)]


def _parse_row(raw: dict[str, str]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for k, v in raw.items():
        if k in _STRS:
            row[k] = v
        elif v == "" or v is None:
            row[k] = None
        elif k in _INTS:
            row[k] = int(float(v))
        else:
            row[k] = float(v)
    return row


# ----------------------------------------------------------------------------- statistics


def higher_is_better(metric: str) -> bool:
    return metric.endswith("_acc") or metric.startswith("pass@")


def arm_order(rows: Sequence[dict[str, Any]]) -> list[str]:
    """grpo, then echo by λ, then verifier_free, then anything else; each arm once."""
    rank = {"grpo": 0, "echo": 1, "verifier_free": 2}
    keyed = {r["arm"]: (rank.get(r["objective"], 3), r["lam"] or 0.0, r["arm"]) for r in rows}
    return sorted(keyed, key=keyed.get)


def arm_stats(rows: Sequence[dict[str, Any]], metric: str) -> dict[str, tuple[float, float, int]]:
    """arm -> (mean, sample std (0 for one seed), seeds with a value)."""
    out = {}
    for arm in arm_order(rows):
        vals = np.array(
            [r[metric] for r in rows if r["arm"] == arm and r.get(metric) is not None], float
        )
        if vals.size:
            std = float(vals.std(ddof=1)) if vals.size > 1 else 0.0
            out[arm] = (float(vals.mean()), std, int(vals.size))
    return out


def best_arm(stats: dict[str, tuple[float, float, int]], metric: str) -> str | None:
    """The arm with the best mean; None if there is no other arm to beat or the top is tied."""
    means = sorted((s[0] for s in stats.values()), reverse=higher_is_better(metric))
    if len(means) < 2 or means[0] == means[1]:
        return None
    return next(a for a, s in stats.items() if s[0] == means[0])


def compare(a: tuple[float, float, int], b: tuple[float, float, int]) -> tuple[float, float, bool]:
    """(mean_a - mean_b, its standard error, whether |difference| > 2 standard errors).

    With one seed per arm there is no spread to compare against, so it never counts as clear.
    """
    (ma, sa, na), (mb, sb, nb) = a, b
    se = math.sqrt(sa**2 / na + sb**2 / nb)
    clear = na > 1 and nb > 1 and abs(ma - mb) > 2 * se
    return ma - mb, se, clear


def _fmt(mean: float, std: float, n: int, bold: bool) -> str:
    text = f"{mean:.3f} ± {std:.3f}" if n > 1 else f"{mean:.3f}"
    return f"**{text}**" if bold else text


# ----------------------------------------------------------------------------- markdown

ENV_TABLE = (
    ("heldout_scenarios/env_ce", "held-out scenarios env CE"),
    ("heldout_tasks/env_ce", "held-out tasks env CE"),
    ("real/env_ce", "real env CE"),
    ("train/env_ce", "train env CE"),
    ("heldout_scenarios/env_acc", "held-out scenarios env acc"),
    ("heldout_tasks/env_acc", "held-out tasks env acc"),
)
POLICY_TABLE = (
    ("heldout_scenarios/action_ce", "held-out scenarios action CE"),
    ("heldout_tasks/action_ce", "held-out tasks action CE"),
    ("train/action_ce", "train action CE"),
    ("heldout_scenarios/action_acc", "held-out scenarios action acc"),
    ("heldout_tasks/action_acc", "held-out tasks action acc"),
    ("pass@1", "pass@1"),
    ("pass@k", "pass@k"),
    ("tool_call_acc", "tool-call acc (teacher-forced)"),
    ("format_error_share", "closed-loop format errors"),
)


def _table(rows: Sequence[dict[str, Any]], columns) -> str:
    labels = {r["arm"]: _label(r) for r in rows}
    arms = arm_order(rows)
    stats = {m: arm_stats(rows, m) for m, _ in columns}
    best = {m: best_arm(stats[m], m) for m, _ in columns}
    seeds = {a: sum(1 for r in rows if r["arm"] == a and r.get("status") == "done") for a in arms}
    head = "| arm | seeds | " + " | ".join(h for _, h in columns) + " |"
    sep = "|---|---:|" + "---:|" * len(columns)
    lines = [head, sep]
    for arm in arms:
        cells = []
        for m, _ in columns:
            s = stats[m].get(arm)
            cells.append("–" if s is None else _fmt(*s, bold=arm == best[m]))
        lines.append(f"| {labels[arm]} | {seeds[arm]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _label(row: dict[str, Any]) -> str:
    return f"echo λ={row['lam']:g}" if row["objective"] == "echo" else row["objective"]


def _setup_line(rows: Sequence[dict[str, Any]]) -> str:
    steps = sorted({r["steps"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    commits = sorted({r["git_commit"] for r in rows if r.get("git_commit")})
    walls = [r["wall_s"] for r in rows if r.get("wall_s") is not None]
    return (
        f"{len(rows)} runs: {len(arm_order(rows))} arms × seeds {seeds}, "
        f"{'/'.join(map(str, steps))} steps each"
        + (f"; {sum(walls) / 60:.1f} min of training in all" if walls else "")
        + (f"; commit {', '.join(commits)}" if commits else "")
    )


def ablation_markdown(rows: Sequence[dict[str, Any]], command: str, plots: Sequence[str]) -> str:
    parts = [
        "# ECHO λ ablation",
        "",
        "Produced by:",
        "",
        "```",
        command,
        "```",
        "",
        _setup_line(rows) + ".",
        "",
        "Mean ± sample std over seeds at the last step; **bold**: the best arm per column "
        "(lowest CE, highest accuracy / pass rate). CE in nats per target token. Env metrics "
        "are on ENV_OUTPUT targets of every episode; action metrics on ACTION targets of "
        "verified-successful episodes (reward >= 1) only. `–`: no value (e.g. a set without "
        "successful episodes, or no closed-loop evaluator).",
        "",
        "## World model (environment tokens)",
        "",
        _table(rows, ENV_TABLE),
        "",
        "## Policy (action tokens) and closed loop",
        "",
        _table(rows, POLICY_TABLE),
        "",
        "## What the numbers support",
        "",
        findings(rows),
        "",
    ]
    if plots:
        parts += ["## Plots", ""] + [
            f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots
        ]
    not_done = [r for r in rows if r.get("status") != "done"]
    if not_done:
        parts += [
            "",
            "Runs not finished: "
            + ", ".join(f"{r['arm']} seed {r['seed']} ({r.get('status')})" for r in not_done),
        ]
    return "\n".join(parts) + "\n"


KEY_METRICS = (
    "heldout_scenarios/env_ce",
    "heldout_tasks/env_ce",
    "real/env_ce",
    "heldout_scenarios/action_ce",
    "heldout_tasks/action_ce",
    "heldout_scenarios/action_acc",
    "heldout_tasks/action_acc",
    "pass@1",
)


POLICY_METRICS = (
    "heldout_scenarios/action_ce",
    "heldout_tasks/action_ce",
    "heldout_scenarios/action_acc",
    "heldout_tasks/action_acc",
    "pass@1",
)


def _verdict(diff: float, clear: bool, metric: str) -> str:
    if not clear:
        return "within the seed spread"
    better = (diff > 0) == higher_is_better(metric)
    return f"**{'better' if better else 'worse'}** beyond 2 SE"


def findings(rows: Sequence[dict[str, Any]]) -> str:
    """Plain statements: a verdict on the policy metrics, then for each key metric the best echo
    arm against grpo and verifier_free, and whether each gap exceeds 2 standard errors (SE) of
    the seed spread."""
    done = [r for r in rows if r.get("status") == "done"]
    if not done:
        return "No finished runs yet."
    labels = {r["arm"]: _label(r) for r in done}
    bullets = []
    tally: dict[str, list[str]] = {"better": [], "worse": [], "within": []}
    for metric in KEY_METRICS:
        stats = arm_stats(done, metric)
        echo = {a: s for a, s in stats.items() if a.startswith("echo")}
        if not echo:
            continue
        values = {v for r in done if (v := r.get(metric)) is not None}
        if metric.startswith("pass@") and len(values) == 1:  # All runs alike: nothing to rank.
            errors = arm_stats(done, "format_error_share")
            share = np.mean([m for m, _, _ in errors.values()]) if errors else None
            bullets.append(
                f"- `{metric}` is {values.pop():.3f} for every run, so it cannot separate the arms"
                + (
                    f"; {share:.0%} of the closed-loop steps were format errors (calls that "
                    "did not parse or named no tool), so at this training length no arm's model "
                    "writes usable calls yet."
                    if share is not None
                    else "."
                )
            )
            continue
        best = best_arm(echo, metric) or next(iter(echo))
        mean, std, _ = echo[best]
        direction = "higher" if higher_is_better(metric) else "lower"
        parts = []
        for other in ("grpo", "verifier_free"):
            if other in stats:
                diff, se, clear = compare(echo[best], stats[other])
                parts.append(
                    f"vs {other} {stats[other][0]:.3f}: Δ {diff:+.3f} ± {se:.3f} SE, "
                    + _verdict(diff, clear, metric)
                )
                if other == "grpo" and metric in POLICY_METRICS:
                    key = "within" if not clear else _verdict(diff, clear, metric)[2:8]
                    tally[key].append(f"`{metric}`")
        bullets.append(
            f"- `{metric}` ({direction} is better): best echo arm {labels[best]} "
            f"{mean:.3f} ± {std:.3f}; " + "; ".join(parts) + "."
        )
    for metric in ("heldout_tasks/env_ce", "heldout_scenarios/env_ce"):
        stats = arm_stats(done, metric)
        if "grpo" not in stats:
            continue
        gaps = []
        for arm, stat in stats.items():
            if arm != "grpo":
                diff, se, clear = compare(stat, stats["grpo"])
                gaps.append(f"{labels[arm]} {diff:+.3f} ± {se:.3f}" + (" (>2 SE)" if clear else ""))
        bullets.append(f"- `{metric}` minus grpo's, every arm (Δ ± SE): " + "; ".join(gaps) + ".")
    if any(tally.values()):
        verdict = (
            "- **Policy verdict (best echo arm vs grpo).** Clearly better on "
            f"{', '.join(tally['better']) or 'no metric'}; clearly worse on "
            f"{', '.join(tally['worse']) or 'no metric'}; not separable from the seed spread on "
            f"{', '.join(tally['within']) or 'no metric'}."
        )
        bullets.insert(0, verdict)
    gaps = []
    for arm in arm_order(done):
        tr = arm_stats([r for r in done if r["arm"] == arm], "train/env_ce").get(arm)
        ho = arm_stats([r for r in done if r["arm"] == arm], "heldout_scenarios/env_ce").get(arm)
        if tr and ho:
            gaps.append(f"{labels[arm]} {ho[0] - tr[0]:+.3f}")
    if gaps:
        bullets.append(
            "- Generalisation gap, held-out-scenario env CE minus train env CE (nats/token; "
            "a large gap means over-fitting to the training scenarios): " + ", ".join(gaps) + "."
        )
    if not any(r.get("pass@1") is not None for r in done):
        bullets.append(
            "- pass@1 / pass@k: not measured (no closed-loop evaluator was run). The "
            "teacher-forced metrics above do not by themselves show that ECHO improves task "
            "success."
        )
    n_seeds = sorted({sum(1 for r in done if r["arm"] == a) for a in labels})
    bullets.append(
        f"- Caveats: {'/'.join(map(str, n_seeds))} seed(s) per arm, so a 2-SE gap is a "
        "loose screen, not a significance test. The best λ is picked per metric on the same "
        "held-out sets it is reported on (no separate validation split), which flatters echo. "
        "grpo never trains on environment tokens, so its worse env CE is expected and by "
        "itself says nothing about the policy."
    )
    return "\n".join(bullets)


def readme_results(rows: Sequence[dict[str, Any]], command: str, out_dir: str = "results") -> str:
    """The README's results section (to paste or include): setup, one table, the findings."""
    short = (
        ("heldout_scenarios/env_ce", "held-out scen. env CE"),
        ("heldout_tasks/env_ce", "held-out tasks env CE"),
        ("heldout_scenarios/action_ce", "held-out scen. action CE"),
        ("heldout_tasks/action_acc", "held-out tasks action acc"),
        ("pass@1", "pass@1"),
    )
    return "\n".join(
        [
            "## Results: does ECHO help?",
            "",
            _setup_line(rows) + f". Regenerate with `{command}`; full tables and plots in "
            f"[{out_dir}/{MARKDOWN_NAME}]({out_dir}/{MARKDOWN_NAME}).",
            "",
            _table(rows, short),
            "",
            f"![held-out env CE against λ]({out_dir}/env_ce_vs_lambda.png)",
            "",
            findings(rows),
            "",
        ]
    )


def splice_readme(path: str, section: str, name: str = "results") -> bool:
    """Replaces the text between the lines `<!-- NAME:begin ... -->` and `<!-- NAME:end -->`
    of a markdown file with `section`; False (and nothing written) when it has no markers."""
    with open(path) as f:
        text = f.read()
    begin = text.find(f"<!-- {name}:begin")
    end = text.find(f"<!-- {name}:end -->")
    if begin < 0 or end < begin:
        return False
    after_begin = text.index("\n", begin) + 1
    atomic_write_text(path, text[:after_begin] + section.rstrip() + "\n" + text[end:])
    return True


# ----------------------------------------------------------------------------- plots


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def arm_colors(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    import matplotlib

    arms = arm_order(rows)
    lams = sorted({r["lam"] for r in rows if r["objective"] == "echo"})
    cmap = matplotlib.colormaps["viridis"]
    out = {}
    for arm in arms:
        row = next(r for r in rows if r["arm"] == arm)
        if row["objective"] == "echo":
            i = lams.index(row["lam"])
            out[arm] = cmap(0.1 + 0.8 * i / max(len(lams) - 1, 1))
        else:
            out[arm] = {"grpo": "black", "verifier_free": "tab:red"}.get(row["objective"], "gray")
    return out


def _mean_curve(series: list[dict[int, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
    vals = np.array([[s[t] for t in steps] for s in series], float)
    if not steps:
        return np.array([]), np.array([]), np.array([])
    return np.array(steps), np.nanmean(vals, 0), np.nanstd(vals, 0)


def _curves(rows, source: str, key: str) -> dict[str, list[dict[int, float]]]:
    """arm -> one {step: value} per seed, read from each run's metrics or eval lines."""
    out: dict[str, list[dict[int, float]]] = {}
    for r in rows:
        wd = r.get("workdir") or ""
        if source == "train":
            lines = RunDir(wd).read_metrics() if os.path.isdir(wd) else []
        else:
            lines = evaluation.read_lines(os.path.join(wd, evaluation.EVAL_FILE))
        pts = {int(m["step"]): float(m[key]) for m in lines if m.get(key) is not None}
        if pts:
            out.setdefault(r["arm"], []).append(pts)
    return out


def save_png(fig, path: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    with atomic_open(path, "wb") as f:
        f.write(buf.getvalue())
    return path


def plot_curves(rows, path: str, source: str, keys: Sequence[tuple[str, str]]) -> str | None:
    """One panel per key: mean over seeds per arm (band: ± std) against the training step."""
    plt = pyplot()

    colors, labels = arm_colors(rows), {r["arm"]: _label(r) for r in rows}
    panels = [(k, t, _curves(rows, source, k)) for k, t in keys]
    panels = [p for p in panels if p[2]]
    if not panels:
        return None
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (_, title, curves) in zip(axes.flat, panels, strict=False):
        for arm in arm_order(rows):
            if arm not in curves:
                continue
            x, m, s = _mean_curve(curves[arm])
            ax.plot(x, m, color=colors[arm], label=labels[arm], marker="." if x.size < 12 else "")
            ax.fill_between(x, m - s, m + s, color=colors[arm], alpha=0.15, lw=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("mean over seeds (± std)")
    axes.flat[len(panels) - 1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    out = save_png(fig, path)
    plt.close(fig)
    return out


def plot_vs_lambda(rows, path: str, metrics: Sequence[tuple[str, str]], ylabel: str) -> str:
    """Echo arms as mean ± std against λ (log axis); other objectives as horizontal bands."""
    plt = pyplot()

    done = [r for r in rows if r.get("status") == "done"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    colors = arm_colors(rows) if rows else {}
    for ax, (metric, title) in zip(axes[0], metrics, strict=True):
        stats = arm_stats(done, metric)
        echo = sorted(
            (r["lam"], stats[r["arm"]])
            for r in {r["arm"]: r for r in done if r["objective"] == "echo"}.values()
            if r["arm"] in stats
        )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("λ (echo)")
        ax.grid(alpha=0.3)
        if not stats:
            ax.text(
                0.5,
                0.5,
                "no data\n(not measured)",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="gray",
            )
            continue
        if echo:
            lam = np.array([e[0] for e in echo])
            mean = np.array([e[1][0] for e in echo])
            std = np.array([e[1][1] for e in echo])
            ax.errorbar(lam, mean, yerr=std, marker="o", capsize=3, color="tab:blue", label="echo")
            ax.set_xscale("log")
        for other in ("grpo", "verifier_free"):
            if other in stats:
                m, s, _ = stats[other]
                ax.axhline(m, color=colors.get(other, "gray"), ls="--", label=other)
                ax.axhspan(m - s, m + s, color=colors.get(other, "gray"), alpha=0.1)
        ax.legend(fontsize=7, loc="best")
    axes[0][0].set_ylabel(ylabel)
    fig.tight_layout()
    out = save_png(fig, path)
    plt.close(fig)
    return out


def make_plots(rows: Sequence[dict[str, Any]], out_dir: str) -> list[str]:
    paths = [
        plot_curves(
            rows,
            os.path.join(out_dir, "curves_train.png"),
            "train",
            (("env_ce", "train env CE (batch)"), ("action_ce", "train action CE (batch)")),
        ),
        plot_curves(
            rows,
            os.path.join(out_dir, "curves_heldout.png"),
            "eval",
            tuple((f"{s}/env_ce", f"{s} env CE") for s in ("train", *HELDOUT))
            + tuple(
                (f"{s}/action_ce", f"{s} action CE") for s in ("heldout_tasks", "heldout_scenarios")
            ),
        ),
        plot_vs_lambda(
            rows,
            os.path.join(out_dir, "env_ce_vs_lambda.png"),
            tuple((f"{s}/env_ce", f"{s} env CE") for s in HELDOUT),
            "env CE (nats/token)",
        ),
        plot_vs_lambda(
            rows,
            os.path.join(out_dir, "action_ce_vs_lambda.png"),
            tuple((f"{s}/action_ce", f"{s} action CE (successful)") for s in HELDOUT[:2]),
            "action CE (nats/token)",
        ),
        plot_vs_lambda(
            rows, os.path.join(out_dir, "pass1_vs_lambda.png"), (("pass@1", "pass@1"),), "pass@1"
        ),
    ]
    return [p for p in paths if p]


def write_report(rows: Sequence[dict[str, Any]], out_dir: str, command: str) -> list[str]:
    """ablation.csv is written by the caller; this writes ABLATION.md, README_results.md and
    the plots from `rows`. Returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    plots = make_plots(rows, out_dir)
    md = os.path.join(out_dir, MARKDOWN_NAME)
    readme = os.path.join(out_dir, README_NAME)
    atomic_write_text(md, ablation_markdown(rows, command, plots))
    atomic_write_text(readme, readme_results(rows, command, os.path.relpath(out_dir)))
    return [md, readme, *plots]


def regenerate(out_dir: str) -> list[str]:
    """Every report file again from ablation.csv and ablation.json (`--report_only`)."""
    with open(os.path.join(out_dir, META_NAME)) as f:
        command = json.load(f)["command"]
    return write_report(read_csv(os.path.join(out_dir, CSV_NAME)), out_dir, command)
