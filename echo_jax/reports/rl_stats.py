"""The sample-efficiency statistics of the on-policy sweep, as pure functions of per-seed curves.

A seed's curve is its iterations' pool success rates against cumulative environment steps
(tool calls in rollouts, the iteration's own included). The question is how many steps an arm
needs to reach a success threshold, and how that compares with grpo's: seeds are few, so every
interval is a percentile bootstrap over seeds, resampled within each arm independently.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

BOOTSTRAP = 10_000  # Resamples per interval.
BASELINE = "grpo"


@dataclasses.dataclass(frozen=True)
class Curve:
    """One seed's run: iteration i's pool success and the environment steps through it."""

    env_steps_I: np.ndarray
    success_I: np.ndarray
    heldout_end: float | None = None  # Greedy held-out pass@1 after the last iteration.


def moving_average(x_I: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over full windows only: entry j averages x[j : j + window]."""
    if len(x_I) < window:
        return np.zeros(0)
    return np.convolve(x_I, np.ones(window) / window, mode="valid")


def steps_to_threshold(curve: Curve, threshold: float, window: int) -> float | None:
    """Environment steps at the end of the first iteration whose trailing `window`-iteration
    mean success reaches `threshold`; None if the run never does."""
    hit = np.nonzero(moving_average(curve.success_I, window) >= threshold - 1e-9)[0]
    return float(curve.env_steps_I[hit[0] + window - 1]) if hit.size else None


def area_under_success(curve: Curve) -> float:
    """Mean success per environment step over the run: each iteration's success rate weighted
    by the steps its rollouts took (1 = every rollout succeeded from the first step)."""
    steps_I = np.diff(np.concatenate([[0.0], curve.env_steps_I]))
    return float(np.sum(curve.success_I * steps_I) / max(curve.env_steps_I[-1], 1e-9))


def _median_steps(steps_RS: np.ndarray) -> np.ndarray:
    """Median over seeds, a never-reached seed counting as infinitely many steps."""
    return np.median(steps_RS, axis=-1)


def _as_steps(values: Sequence[float | None]) -> np.ndarray:
    return np.array([math.inf if v is None else v for v in values], float)


def ratio_to_baseline(
    arm: Sequence[float | None],
    base: Sequence[float | None],
    paired: bool = False,
    seed: int = 0,
) -> dict[str, object]:
    """Median steps-to-threshold of `arm` over that of `base` (< 1: the arm needs fewer), with
    a 95% percentile-bootstrap interval. A seed that never reaches the threshold counts as
    infinitely many steps, so a ratio can be infinite (written None: "never"); a resample where
    both medians are infinite has no ratio and is left out (its share is reported).

    paired: entry i of both is seed i, and a seed's runs share their sampling keys (the same
    first rollouts in every arm), so seeds are resampled jointly; otherwise each arm apart."""
    a, b = _as_steps(arm), _as_steps(base)
    rng = np.random.default_rng(seed)
    pick_a = rng.integers(len(a), size=(BOOTSTRAP, len(a)))
    if paired and len(a) != len(b):
        raise ValueError(f"paired samples differ in size: {len(a)} and {len(b)}")
    pick_b = pick_a if paired else rng.integers(len(b), size=(BOOTSTRAP, len(b)))
    a_R = _median_steps(a[pick_a])
    b_R = _median_steps(b[pick_b])
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio_R = a_R / b_R
        point = float(_median_steps(a) / _median_steps(b))
    defined = ratio_R[~np.isnan(ratio_R)]
    if defined.size == 0:
        return {"median": None, "ci95": [None, None], "bootstrap_median": None,
                "undefined_share": 1.0}  # fmt: skip
    lo, mid, hi = np.percentile(defined, [2.5, 50, 97.5], method="lower")
    return {
        "median": None if math.isnan(point) else _finite(point),
        "ci95": [_finite(lo), _finite(hi)],
        "bootstrap_median": _finite(mid),
        "undefined_share": 1.0 - defined.size / BOOTSTRAP,
    }


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def mean_ci(values: Sequence[float], seed: int = 0) -> tuple[float, float, float]:
    """(mean, 2.5th, 97.5th percentile of the bootstrapped mean) over seeds."""
    x = np.asarray(values, float)
    if x.size == 0:
        return (math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(x.size, size=(BOOTSTRAP, x.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return (float(x.mean()), float(lo), float(hi))


def band(curves: Sequence[Curve], seed: int = 0) -> tuple[np.ndarray, ...]:
    """(x, mean, lo, hi) per iteration across seeds: x the seeds' mean env steps there, the
    band a bootstrap 95% interval of the mean success. Only iterations every seed reached."""
    n = min(len(c.success_I) for c in curves)
    steps_SI = np.stack([c.env_steps_I[:n] for c in curves])
    success_SI = np.stack([c.success_I[:n] for c in curves])
    stats = np.array([mean_ci(success_SI[:, i], seed) for i in range(n)]).reshape(n, 3)
    return steps_SI.mean(0), stats[:, 0], stats[:, 1], stats[:, 2]


def verdict(ratio: Mapping[str, object]) -> str:
    """faster / slower / not separable, from where the interval lies relative to 1."""
    lo, hi = ratio["ci95"]
    if ratio["undefined_share"] == 1.0:
        return "not separable (neither reaches the threshold)"
    if hi is not None and hi < 1:
        return "faster"
    if lo is None or lo > 1:  # lo is None: even the interval's low end is "never".
        return "slower"
    return "not separable"


def summarize(
    arms: Mapping[str, Sequence[Curve]],
    threshold: float,
    window: int,
    last: int = 3,
    paired: bool = False,
) -> dict[str, dict[str, object]]:
    """Per arm, the fields of results/rl_summary.json (and a few more for RL.md). paired: the
    arms' curves are the same seeds in the same order (see ratio_to_baseline)."""
    reach = {
        name: [steps_to_threshold(c, threshold, window) for c in curves]
        for name, curves in arms.items()
    }
    out = {}
    for name, curves in arms.items():
        heldout = [c.heldout_end for c in curves if c.heldout_end is not None]
        out[name] = {
            "seeds": len(curves),
            "iterations": min(len(c.success_I) for c in curves),
            "env_steps_final": [float(c.env_steps_I[-1]) for c in curves],
            "success_first": float(np.mean([c.success_I[0] for c in curves])),
            "success_last": float(np.mean([c.success_I[-last:].mean() for c in curves])),
            "steps_to_threshold": reach[name],
            "median_steps_to_threshold": _finite(float(_median_steps(_as_steps(reach[name])))),
            "ratio_to_grpo": (
                ratio_to_baseline(reach[name], reach[BASELINE], paired)
                if BASELINE in reach
                else None
            ),
            "auc": mean_ci([area_under_success(c) for c in curves]),
            "heldout_pass@1_end": mean_ci(heldout) if heldout else None,
        }
    return out
