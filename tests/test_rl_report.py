"""The sweep's sample-efficiency statistics against values worked out by hand, and the report
written from made-up runs (no rollouts)."""

import json
import os

import numpy as np
import pytest

from echo_jax.reports import rl_report, rl_stats, rl_sweep
from echo_jax.reports.rl_stats import Curve
from echo_jax.reports.sweep import Arm
from echo_jax.train.run_dir import RunDir


def curve(success, steps, heldout=None):
    return Curve(np.array(steps, float), np.array(success, float), heldout)


def test_steps_to_threshold_uses_the_first_full_window():
    c = curve([0.2, 0.5, 0.8, 0.9, 1.0], [10, 25, 45, 60, 80])
    # Windows of 3: (0.2+0.5+0.8)/3 = 0.5, (0.5+0.8+0.9)/3 = 0.733, (0.8+0.9+1)/3 = 0.9.
    assert rl_stats.steps_to_threshold(c, 0.7, 3) == 60
    assert rl_stats.steps_to_threshold(c, 0.5, 3) == 45  # Not 10: the window must be full.
    assert rl_stats.steps_to_threshold(c, 0.95, 3) is None
    assert rl_stats.steps_to_threshold(c, 0.8, 1) == 45


def test_area_under_success_weighs_iterations_by_their_steps():
    # 10 steps at 0.5, then 20 steps at 1.0: (5 + 20) / 30.
    assert rl_stats.area_under_success(curve([0.5, 1.0], [10, 30])) == pytest.approx(25 / 30)


def test_ratio_of_identical_seeds_has_no_spread_and_never_is_infinite():
    r = rl_stats.ratio_to_baseline([50, 50, 50], [100, 100, 100])
    assert r["median"] == 0.5 and r["ci95"] == [0.5, 0.5] and rl_stats.verdict(r) == "faster"
    slow = rl_stats.ratio_to_baseline([None] * 3, [100, 100, 100])
    assert slow["median"] is None and slow["ci95"] == [None, None]
    assert rl_stats.verdict(slow) == "slower"
    neither = rl_stats.ratio_to_baseline([None] * 3, [None] * 3)
    assert neither["undefined_share"] == 1.0 and rl_stats.verdict(neither).startswith("not sep")


def test_ratio_interval_covers_one_when_the_arms_overlap():
    r = rl_stats.ratio_to_baseline([80, 100, 120, 90, 110], [85, 105, 115, 95, 100])
    lo, hi = r["ci95"]
    assert lo < 1 < hi and rl_stats.verdict(r) == "not separable"
    # The point estimate is the ratio of the medians: 100 / 100.
    assert r["median"] == pytest.approx(1.0)


def test_mean_ci_brackets_the_mean():
    mean, lo, hi = rl_stats.mean_ci([0.0, 1.0, 0.0, 1.0])
    assert mean == 0.5 and 0.0 <= lo < 0.5 < hi <= 1.0
    assert rl_stats.mean_ci([0.3, 0.3]) == pytest.approx((0.3, 0.3, 0.3))


def test_report_from_made_up_runs(tmp_path):
    """grpo climbs in 3 iterations, echo in 2: echo reaches 0.8 sooner in every seed."""
    specs = rl_sweep.specs([Arm("grpo", 0.0), Arm("echo", 0.1)], [0, 1, 2], str(tmp_path), [])
    success = {"grpo": [0.2, 0.4, 0.6, 0.9, 0.9, 1.0], "echo": [0.2, 0.8, 0.9, 0.9, 1.0, 1.0]}
    for spec in specs:
        run = RunDir(spec.workdir)
        os.makedirs(run.path)
        run.append_metrics({"iteration": 0, "env_steps": 0, "heldout_pass@1": 0.25})
        for i, s in enumerate(success[spec.arm.objective], start=1):
            run.append_metrics(
                {"iteration": i, "env_steps": 100 * i + spec.seed, "success_rate": s}
                | {"logp_gap_mean": 1e-7, "env_ce_fresh": 1.0, "kl": 0.01}
                | ({"heldout_pass@1": 0.5} if i == 6 else {})
            )
    rows = rl_report.collect(specs)
    # A longer run (an earlier sweep with more iterations) is compared at the common budget.
    extra = dict(rows[-1], iteration=7, env_steps=10_000, success_rate=0.0)
    rows.append(extra)
    assert rl_report.budget(rows) == 6
    assert all(len(c.success_I) == 6 for cs in rl_report.curves(rows).values() for c in cs)
    out = tmp_path / "out"
    written = rl_report.write(rows, str(out), {s.name: s.command for s in specs}, "setup")
    assert len(written) == 5  # csv, summary, markdown, two plots
    summary = json.loads((out / "rl_summary.json").read_text())
    grpo, echo = summary["grpo"], summary["echo_lam0.1"]
    assert grpo["seeds"] == 3 and grpo["success_first"] == pytest.approx(0.2)
    assert grpo["success_last"] == pytest.approx((0.9 + 0.9 + 1.0) / 3)
    # grpo's 3-iteration mean first reaches 0.8 over iterations 3-5 ((0.6+0.9+0.9)/3 = 0.8);
    # echo's over iterations 2-4.
    assert grpo["steps_to_threshold"] == [500, 501, 502]
    assert echo["steps_to_threshold"] == [400, 401, 402]
    assert echo["median_steps_to_threshold"] == 401
    assert echo["ratio_to_grpo"]["median"] == pytest.approx(401 / 501)
    hi = echo["ratio_to_grpo"]["ci95"][1]
    assert hi < 1
    text = (out / "RL.md").read_text()
    assert "| echo λ=0.1 | 3 | 400, 401, 402 | 401 |" in text and "faster" in text


def test_paired_resampling_keeps_a_seed_with_its_partner():
    """Seed i of the arm always needs 0.9 times seed i of grpo, while the seeds themselves
    differ widely: paired, every resample's ratio is 0.9; resampled apart, the interval is
    wide."""
    base = [100.0, 200.0, 300.0, 400.0, 500.0]
    arm = [0.9 * b for b in base]
    paired = rl_stats.ratio_to_baseline(arm, base, paired=True)
    assert paired["ci95"] == pytest.approx([0.9, 0.9]) and rl_stats.verdict(paired) == "faster"
    apart = rl_stats.ratio_to_baseline(arm, base)
    assert apart["ci95"][0] < 0.9 < 1 < apart["ci95"][1]
