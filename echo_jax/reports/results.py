"""Sweep results as a table of runs, shared by the λ ablation and the RL sweep's reports.

One row per run (arm, seed): the ablation's CSV columns and their round trip, statistics across
seeds per arm, and the figure helpers every report draws with. The ablation's own pages are
written by ablation_report (markdown) and ablation_plots (PNGs).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from echo_jax.config import EVAL_SPLITS
from echo_jax.train import evaluation
from echo_jax.util.atomic import atomic_open

CSV_NAME = "ablation.csv"
META_NAME = "ablation.json"  # The sweep's command and grid, written next to the CSV.

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


def arm_label(row: dict[str, Any]) -> str:
    """How tables and legends name an arm: "echo λ=0.1", "grpo", ..."""
    return f"echo λ={row['lam']:g}" if row["objective"] == "echo" else row["objective"]


# ----------------------------------------------------------------------------- figures


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def arm_colors(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One colour per arm, the same in every figure: grpo black, verifier_free red, echo arms
    along viridis in λ order."""
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


def save_png(fig, path: str) -> str:
    """Writes the figure whole or not at all, so a killed report never leaves half a PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    with atomic_open(path, "wb") as f:
        f.write(buf.getvalue())
    return path
