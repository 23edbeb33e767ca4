"""The on-policy grids' numbers, read from the runs' committed small files alone (the text and
plots of results/RL.md are `rl_markdown`'s).

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

from echo_jax.reports import rl_stats
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
    ("heldout_action_ce_end", "held-out tasks action CE, end (what it cost the policy)", False),
)
DESCRIBE = (
    "all_fail_share",
    "all_success_share",
    "format_error_last",
    "action_ce_fresh_last",
    "grad_norm_pg",
    "grad_norm_env",
    "grad_cos",
)


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
        "action_ce_fresh_last": _mean(m.get("action_ce_fresh") for m in its[-LAST:]),
        "heldout_pass_start": _at(run["lines"], 0, "heldout_pass@1"),
        "heldout_pass_end": _at(run["lines"], n, "heldout_pass@1"),
        "heldout_env_ce_start": _at(run["lines"], 0, "tf_heldout_tasks/env_ce"),
        "heldout_env_ce_end": _at(run["lines"], n, "tf_heldout_tasks/env_ce"),
        "heldout_scenarios_env_ce_end": _at(run["lines"], n, "tf_heldout_scenarios/env_ce"),
        "heldout_action_ce_end": _at(run["lines"], n, "tf_heldout_tasks/action_ce"),
        "all_fail_share": _mean(m.get("all_fail_groups") for m in its),
        "all_success_share": _mean(m.get("all_success_groups") for m in its),
        "format_error_last": _mean(m.get("format_error_share") for m in its[-LAST:]),
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
