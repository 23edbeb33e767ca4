"""The on-policy grid's statistics and report: expected values worked out by hand."""

import json
import math
import os
import shutil

import numpy as np
import pytest

from echo_jax.reports import rl_markdown, rl_report, rl_stats, rl_sweep
from echo_jax.util.choices import ConfigError


def test_sign_flip_p_enumerates_every_sign_pattern():
    # Means of the 8 patterns of (1, 2, 3): ±2, ±0, ±2/3, ±4/3; only (+++) and (---) reach 2.
    assert rl_stats.sign_flip_p([1.0, 2.0, 3.0]) == pytest.approx(2 / 8)
    assert rl_stats.sign_flip_p([1.0, -1.0]) == 1.0  # The observed mean 0: every pattern.
    assert rl_stats.sign_flip_p([0.5] * 8) == pytest.approx(2 / 256)  # The smallest at 8 pairs.
    assert math.isnan(rl_stats.sign_flip_p([]))


def test_holm_steps_down_and_keeps_the_order():
    adjusted = rl_stats.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": math.nan})
    # Sorted 0.01, 0.03, 0.04 times 3, 2, 1: 0.03, 0.06, 0.04 -> running max 0.03, 0.06, 0.06.
    assert adjusted["a"] == pytest.approx(0.03)
    assert adjusted["c"] == pytest.approx(0.06) and adjusted["b"] == pytest.approx(0.06)
    assert math.isnan(adjusted["d"])


def test_paired_endpoint_and_verdicts():
    base = {s: 0.1 * s for s in range(8)}
    arm = {s: v + 0.2 for s, v in base.items()}  # The seeds differ widely, the pairs by 0.2.
    e = rl_stats.endpoint(arm, base)
    assert e["mean_diff"] == pytest.approx(0.2) and e["ci95"] == pytest.approx([0.2, 0.2])
    assert e["p_value"] == pytest.approx(2 / 256) and e["seeds"] == 8
    assert rl_stats.verdict(e, higher_is_better=True) == "helps"
    assert rl_stats.verdict(e, higher_is_better=False) == "hurts"
    five = rl_stats.endpoint({s: arm[s] for s in range(5)}, base)
    assert five["p_value"] == pytest.approx(2 / 32)  # > 0.05, however clear: 6 pairs needed.
    assert rl_stats.min_pairs() == 6
    assert rl_stats.verdict(five, True) == "too few pairs (5 < 6)"
    six = rl_stats.endpoint({s: -arm[s] if s == 5 else arm[s] for s in range(6)}, base)
    assert six["p_value"] > 0.05 and rl_stats.verdict(six, True) == "not separable"
    assert rl_stats.paired({0: 1.0, 1: None, 2: 3.0}, {0: 0.5, 1: 1.0, 3: 1.0}) == [0.5]


def test_first_hit_is_one_based_and_censored():
    assert rl_stats.first_hit([0.1, 0.5, 0.9], 0.5, censored=4) == 2
    assert rl_stats.first_hit([0, 0, 0], 1, censored=4) == 4


def _grid(folder, arms, runs):
    """A grid folder as rl_sweep writes it: grid.json and each run's metrics.jsonl and pool."""
    os.makedirs(folder)
    grid = {"name": os.path.basename(folder), "regime": "sparse", "title": "made up",
            "command": "python -m experiments.rl_sweep", "setup": "setup", "arms": arms,
            "pool": {"tasks": [["a", 0], ["a", 1]],
                     "bands": {"a/0": "zero", "a/1": "low"}}}  # fmt: skip
    with open(os.path.join(folder, "grid.json"), "w") as f:
        json.dump(grid, f)
    for name, lines in runs.items():
        os.makedirs(os.path.join(folder, name))
        with open(os.path.join(folder, name, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(m) + "\n" for m in lines)
        with open(os.path.join(folder, name, "pool.json"), "w") as f:
            json.dump(grid["pool"] | {"heldout": [["h", 0], ["h", 1]]}, f)
    return str(folder)


def _lines(success, zero_first, heldout_ce):
    """Iterations 0..len(success) of 10 rollouts each; the zero task first won at zero_first."""
    lines = [{"iteration": 0, "env_steps": 0, "heldout_pass@1": 0.0,
              "tf_heldout_tasks/env_ce": 2.0}]  # fmt: skip
    for i, s in enumerate(success, start=1):
        lines.append({"iteration": i, "env_steps": 50 * i, "rollouts": 10, "success_rate": s,
                      "env_ce_fresh": heldout_ce, "logp_gap_mean": 1e-7, "all_fail_groups": 0.5,
                      "all_success_groups": 0.0, "grad_norm_pg": 0.1, "grad_norm_env": 0.2,
                      "grad_cos": 0.0, "format_error_share": 0.1 * i, "action_ce_fresh": 1.0 + i,
                      "task_successes": {"a/0": int(i >= zero_first), "a/1": 1}})  # fmt: skip
    lines[-1] |= {
        "heldout_pass@1": 0.5,
        "tf_heldout_tasks/env_ce": heldout_ce,
        "tf_heldout_tasks/action_ce": heldout_ce / 2,
    }
    return lines


def test_report_from_made_up_runs_and_byte_for_byte_again(tmp_path):
    """Over 8 seeds echo's success is grpo's + 0.1 at every iteration and its zero task is
    first won at iteration 2 instead of 4: echo helps, p = 2/256."""
    arms = {"grpo": {"label": "grpo", "role": "primary"},
            "echo_lam0.1": {"label": "echo λ=0.1", "role": "primary"}}  # fmt: skip
    runs = {}
    for s in range(8):
        base = [0.1 + 0.01 * s, 0.3, 0.4, 0.6]
        runs[f"grpo_seed{s}"] = _lines(base, zero_first=4, heldout_ce=1.0)
        runs[f"echo_lam0.1_seed{s}"] = _lines([b + 0.1 for b in base], 2, heldout_ce=0.8)
    runs["grpo_seed0"].append(dict(runs["grpo_seed0"][-1], iteration=5))  # Past the budget.
    folder = _grid(tmp_path / "results" / "rl" / "sparse", arms, runs)
    out = tmp_path / "results"
    written = rl_markdown.write([folder], str(out))
    summary = json.loads((out / "rl_summary.json").read_text())["sparse"]
    assert summary["budget_iterations"] == 4 and summary["heldout_tasks"] == [["h", 0], ["h", 1]]
    echo = summary["arms"]["echo_lam0.1"]
    primary = echo["primary_vs_grpo"]
    assert primary["mean_diff"] == pytest.approx(0.1) and primary["p_value"] == pytest.approx(
        2 / 256
    )
    assert primary["verdict"] == "helps"
    first = echo["secondary_vs_grpo"]["first_success_zero"]
    assert first["mean_diff"] == pytest.approx(-2.0) and first["verdict"] == "helps"
    # grpo reaches 0.5 at iteration 4 (40 rollouts), echo at iteration 3 (0.5 exactly): 30.
    assert echo["secondary_vs_grpo"]["rollouts_to_half"]["mean_diff"] == pytest.approx(-10.0)
    world = echo["world_model_vs_grpo"]["heldout_env_ce_end"]
    assert world["mean_diff"] == pytest.approx(-0.2) and world["verdict"] == "helps"
    action = echo["world_model_vs_grpo"]["heldout_action_ce_end"]
    assert action["mean_diff"] == pytest.approx(-0.1)  # 0.8 / 2 - 1.0 / 2
    text = (out / "RL.md").read_text()
    assert text.startswith("# ECHO against GRPO") and "echo λ=0.1: helps" in text.splitlines()[2]
    # A copy of the committed files elsewhere (a fresh clone) gives the same bytes.
    again = tmp_path / "clone" / "results"
    copy = again / "rl" / "sparse"
    shutil.copytree(folder, copy)
    rl_markdown.write([str(copy)], str(again))
    for path in written:
        name = os.path.basename(path)
        assert (again / name).read_bytes() == (out / name).read_bytes(), name


def test_run_endpoints_censor_and_read_the_zero_tasks():
    run = {"lines": _lines([0.1, 0.2, 0.3], zero_first=9, heldout_ce=1.0),
           "pool": {"bands": {"a/0": "zero", "a/1": "low"}}}  # fmt: skip
    e = rl_report.run_endpoints(run, 3)
    assert e["mean_success"] == pytest.approx(0.2)
    assert e["rollouts_to_half"] == pytest.approx(30 + 10)  # Never: one iteration past.
    assert e["first_success_zero"] == 4 and e["zero_tasks_solved"] == 0.0
    assert np.isclose(e["heldout_env_ce_start"], 2.0) and e["heldout_env_ce_end"] == 1.0
    five = {"lines": _lines([0.1] * 5, zero_first=9, heldout_ce=1.0), "pool": run["pool"]}
    last = rl_report.run_endpoints(five, 5)
    assert last["format_error_last"] == pytest.approx(0.4)  # (0.3 + 0.4 + 0.5) / 3
    assert last["action_ce_fresh_last"] == pytest.approx(5.0)  # (4 + 5 + 6) / 3


def test_arms_parse_with_the_rules_lambda_and_flags():
    assert rl_sweep.parse_arm("grpo").name == "grpo"
    arm = rl_sweep.parse_arm("echo:L:weight_verifier=0", lam_star=0.2)
    assert arm.lam == 0.2 and arm.name == "echo_lam0.2_weight_verifier0"
    assert rl_sweep.parse_arm("echo:L/4", lam_star=0.2).lam == 0.05
    assert rl_sweep.parse_arm("echo:0.1").lam == 0.1
    spec = rl_sweep.spec_for(arm, 3, "root", ["--iterations=2"])
    assert spec.argv[-2:] == ("--iterations=2", "--weight_verifier=0")
    with pytest.raises(ConfigError, match="not measured"):
        rl_sweep.parse_arm("echo:L")
    with pytest.raises(ConfigError, match="needs a λ"):
        rl_sweep.parse_arm("echo")


def test_export_copies_a_runs_small_files_only(tmp_path):
    run = tmp_path / "run"
    (run / "rollouts").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    for name in (*rl_report.RUN_FILES, "rollouts/iter_0001.jsonl.gz"):
        (run / name).write_text(name)
    rl_sweep.export_run(str(run), str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path / "out")) == sorted(rl_report.RUN_FILES)
