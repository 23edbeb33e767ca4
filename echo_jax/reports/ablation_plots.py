"""The λ ablation's figures: training and held-out curves per arm, and metrics against λ."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from echo_jax.reports import results
from echo_jax.train import evaluation
from echo_jax.train.run_dir import RunDir
from echo_jax.util.jsonl import read_jsonl

HELDOUT = ("heldout_tasks", "heldout_scenarios", "real")


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
            lines = read_jsonl(os.path.join(wd, evaluation.EVAL_FILE))
        pts = {int(m["step"]): float(m[key]) for m in lines if m.get(key) is not None}
        if pts:
            out.setdefault(r["arm"], []).append(pts)
    return out


def plot_curves(rows, path: str, source: str, keys: Sequence[tuple[str, str]]) -> str | None:
    """One panel per key: mean over seeds per arm (band: ± std) against the training step."""
    plt = results.pyplot()

    colors, labels = results.arm_colors(rows), {r["arm"]: results.arm_label(r) for r in rows}
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
        for arm in results.arm_order(rows):
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
    out = results.save_png(fig, path)
    plt.close(fig)
    return out


def plot_vs_lambda(rows, path: str, metrics: Sequence[tuple[str, str]], ylabel: str) -> str:
    """Echo arms as mean ± std against λ (log axis); other objectives as horizontal bands."""
    plt = results.pyplot()

    done = [r for r in rows if r.get("status") == "done"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    colors = results.arm_colors(rows) if rows else {}
    for ax, (metric, title) in zip(axes[0], metrics, strict=True):
        stats = results.arm_stats(done, metric)
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
    out = results.save_png(fig, path)
    plt.close(fig)
    return out


def make_plots(rows: Sequence[dict[str, Any]], out_dir: str) -> list[str]:
    """Every figure ABLATION.md shows; a figure with no data to draw is left out."""
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
