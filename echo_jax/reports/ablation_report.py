"""The λ ablation's pages: results/ABLATION.md and the summary section of docs/results.md.

Everything is computed from the CSV rows (plus each run's metrics.jsonl / eval.jsonl for the
plots), so `python -m experiments.sweep --report_only` regenerates every file without training.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from echo_jax.reports import ablation_plots, results
from echo_jax.reports.generated_sections import splice_section
from echo_jax.util.atomic import atomic_write_text

MARKDOWN_NAME = "ABLATION.md"
SECTION = "results"  # The docs page's markers: <!-- results:begin ... --> ... <!-- results:end -->


def _fmt(mean: float, std: float, n: int, bold: bool) -> str:
    text = f"{mean:.3f} ± {std:.3f}" if n > 1 else f"{mean:.3f}"
    return f"**{text}**" if bold else text


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
    labels = {r["arm"]: results.arm_label(r) for r in rows}
    arms = results.arm_order(rows)
    stats = {m: results.arm_stats(rows, m) for m, _ in columns}
    best = {m: results.best_arm(stats[m], m) for m, _ in columns}
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


def _setup_line(rows: Sequence[dict[str, Any]]) -> str:
    steps = sorted({r["steps"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    commits = sorted({r["git_commit"] for r in rows if r.get("git_commit")})
    walls = [r["wall_s"] for r in rows if r.get("wall_s") is not None]
    return (
        f"{len(rows)} runs: {len(results.arm_order(rows))} arms × seeds {seeds}, "
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
    better = (diff > 0) == results.higher_is_better(metric)
    return f"**{'better' if better else 'worse'}** beyond 2 SE"


def findings(rows: Sequence[dict[str, Any]]) -> str:
    """Plain statements: a verdict on the policy metrics, then for each key metric the best echo
    arm against grpo and verifier_free, and whether each gap exceeds 2 standard errors (SE) of
    the seed spread."""
    done = [r for r in rows if r.get("status") == "done"]
    if not done:
        return "No finished runs yet."
    labels = {r["arm"]: results.arm_label(r) for r in done}
    bullets = []
    tally: dict[str, list[str]] = {"better": [], "worse": [], "within": []}
    for metric in KEY_METRICS:
        stats = results.arm_stats(done, metric)
        echo = {a: s for a, s in stats.items() if a.startswith("echo")}
        if not echo:
            continue
        values = {v for r in done if (v := r.get(metric)) is not None}
        if metric.startswith("pass@") and len(values) == 1:  # All runs alike: nothing to rank.
            errors = results.arm_stats(done, "format_error_share")
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
        best = results.best_arm(echo, metric) or next(iter(echo))
        mean, std, _ = echo[best]
        direction = "higher" if results.higher_is_better(metric) else "lower"
        parts = []
        for other in ("grpo", "verifier_free"):
            if other in stats:
                diff, se, clear = results.compare(echo[best], stats[other])
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
        stats = results.arm_stats(done, metric)
        if "grpo" not in stats:
            continue
        gaps = []
        for arm, stat in stats.items():
            if arm != "grpo":
                diff, se, clear = results.compare(stat, stats["grpo"])
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
    for arm in results.arm_order(done):
        of_arm = [r for r in done if r["arm"] == arm]
        tr = results.arm_stats(of_arm, "train/env_ce").get(arm)
        ho = results.arm_stats(of_arm, "heldout_scenarios/env_ce").get(arm)
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


def summary_section(rows: Sequence[dict[str, Any]], command: str, results_link: str) -> str:
    """The docs page's section: setup, one short table, the findings. `results_link` is the
    results folder as seen from the page, so its links resolve where the section is pasted."""
    short = (
        ("heldout_scenarios/env_ce", "held-out scen. env CE"),
        ("heldout_tasks/env_ce", "held-out tasks env CE"),
        ("heldout_scenarios/action_ce", "held-out scen. action CE"),
        ("heldout_tasks/action_acc", "held-out tasks action acc"),
        ("pass@1", "pass@1"),
    )
    report = f"{results_link}/{MARKDOWN_NAME}"
    return "\n".join(
        [
            "## Results: does ECHO help?",
            "",
            _setup_line(rows) + f". Regenerate with `{command}`; full tables and plots in "
            f"[{report}]({report}).",
            "",
            _table(rows, short),
            "",
            f"![held-out env CE against λ]({results_link}/env_ce_vs_lambda.png)",
            "",
            findings(rows),
            "",
        ]
    )


def write_report(rows: Sequence[dict[str, Any]], out_dir: str, command: str) -> list[str]:
    """ablation.csv is written by the caller; this writes ABLATION.md and the plots from
    `rows`. Returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    plots = ablation_plots.make_plots(rows, out_dir)
    md = os.path.join(out_dir, MARKDOWN_NAME)
    atomic_write_text(md, ablation_markdown(rows, command, plots))
    return [md, *plots]


def write_section(page: str, rows: Sequence[dict[str, Any]], command: str, out_dir: str) -> bool:
    """Rewrites the summary section of the docs page `page` between its markers; False (and
    nothing written) when the page has none."""
    link = os.path.relpath(out_dir, os.path.dirname(os.path.abspath(page)))
    return splice_section(page, summary_section(rows, command, link), SECTION)


def load(out_dir: str) -> tuple[list[dict[str, Any]], str]:
    """The rows of ablation.csv and the command that made them (from ablation.json)."""
    with open(os.path.join(out_dir, results.META_NAME)) as f:
        command = json.load(f)["command"]
    return results.read_csv(os.path.join(out_dir, results.CSV_NAME)), command


def regenerate(out_dir: str) -> list[str]:
    """Every report file again from ablation.csv and ablation.json (`--report_only`)."""
    rows, command = load(out_dir)
    return write_report(rows, out_dir, command)
