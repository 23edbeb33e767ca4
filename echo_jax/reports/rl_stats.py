"""The on-policy grid's statistics, as pure functions of per-seed values.

Seed s of every arm draws the same sampling keys, so arms are compared seed by seed: an
endpoint is one number per run, and an arm's effect is the mean over seeds of (arm − grpo),
with an exact sign-flip permutation test (under no effect each paired difference is as likely
negative as positive; all 2^n sign patterns are enumerated) and a percentile-bootstrap 95%
interval of the mean difference. Secondary endpoints are Holm-corrected together.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence

import numpy as np

BOOTSTRAP = 10_000  # Resamples per interval.
BASELINE = "grpo"
ALPHA = 0.05


@dataclasses.dataclass(frozen=True)
class Curve:
    """One seed's run over the common budget: rollouts through iteration i and its success."""

    rollouts_I: np.ndarray
    success_I: np.ndarray


def mean_ci(values: Sequence[float], seed: int = 0) -> tuple[float, float, float]:
    """(mean, 2.5th, 97.5th percentile of the bootstrapped mean) over seeds."""
    x = np.asarray(values, float)
    if x.size == 0:
        return (math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(x.size, size=(BOOTSTRAP, x.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return (float(x.mean()), float(lo), float(hi))


def sign_flip_p(diffs: Sequence[float]) -> float:
    """Exact two-sided p-value of the mean of paired differences: the share of the 2^n sign
    patterns whose mean is at least as far from 0 as the observed one (itself included)."""
    d = np.asarray(diffs, float)
    if d.size == 0:
        return math.nan
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
    means = np.abs(signs @ d) / d.size
    observed = abs(d.mean())
    return float(np.mean(means >= observed - 1e-12 * max(1.0, observed)))


def holm(p_values: Mapping[str, float]) -> dict[str, float]:
    """Holm's step-down adjusted p-values (NaN entries are left out of the family)."""
    finite = sorted((p, k) for k, p in p_values.items() if not math.isnan(p))
    m = len(finite)
    out = {k: math.nan for k in p_values}
    running = 0.0
    for i, (p, k) in enumerate(finite):
        running = max(running, min(1.0, (m - i) * p))
        out[k] = running
    return out


def paired(arm: Mapping[int, float], base: Mapping[int, float]) -> list[float]:
    """arm − base for every seed both have a finite value for, in seed order."""
    seeds = sorted(s for s in arm.keys() & base.keys() if _ok(arm[s]) and _ok(base[s]))
    return [arm[s] - base[s] for s in seeds]


def _ok(x) -> bool:
    return x is not None and math.isfinite(x)


def endpoint(arm: Mapping[int, float], base: Mapping[int, float], seed: int = 0) -> dict:
    """The paired comparison of one endpoint: mean difference, its interval, the exact p."""
    d = paired(arm, base)
    mean, lo, hi = mean_ci(d, seed)
    return {"seeds": len(d), "mean_diff": mean, "ci95": [lo, hi], "p_value": sign_flip_p(d)}


def min_pairs() -> int:
    """The fewest pairs whose exact sign-flip test can give p < ALPHA: with n pairs the
    smallest two-sided p is 2/2^n (every difference of one sign)."""
    return next(n for n in itertools.count(1) if 2.0 / 2**n < ALPHA)


def verdict(result: Mapping[str, object], higher_is_better: bool, p_key: str = "p_value") -> str:
    """helps / hurts when the interval excludes 0 and the (adjusted) p is below ALPHA; too few
    pairs when no outcome of that many could be; otherwise not separable."""
    lo, hi = result["ci95"]
    p = result[p_key]
    if 0 < result["seeds"] < min_pairs():
        return f"too few pairs ({result['seeds']} < {min_pairs()})"
    if not result["seeds"] or math.isnan(p) or p >= ALPHA:
        return "not separable"
    if lo > 0 or hi < 0:
        better = (lo > 0) == higher_is_better
        return "helps" if better else "hurts"
    return "not separable"


def first_hit(values_I: Sequence[float], threshold: float, censored: float) -> float:
    """1-based index of the first entry >= threshold, or `censored` if none is."""
    hit = np.nonzero(np.asarray(values_I, float) >= threshold - 1e-9)[0]
    return float(hit[0] + 1) if hit.size else censored


def band(curves: Sequence[Curve], seed: int = 0) -> tuple[np.ndarray, ...]:
    """(x, mean, lo, hi) per iteration across seeds: x the rollouts through it, the band a
    bootstrap 95% interval of the mean success. Only iterations every seed reached."""
    n = min(len(c.success_I) for c in curves)
    success_SI = np.stack([c.success_I[:n] for c in curves])
    stats = np.array([mean_ci(success_SI[:, i], seed) for i in range(n)]).reshape(n, 3)
    return curves[0].rollouts_I[:n], stats[:, 0], stats[:, 1], stats[:, 2]
