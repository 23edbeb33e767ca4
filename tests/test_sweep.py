import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from echo_jax.config import Config, DataConfig, LossConfig
from echo_jax.reports import ablation_report, results, sweep
from echo_jax.reports.generated_sections import splice_section
from echo_jax.train import evaluation
from echo_jax.train.run_dir import RunDir
from echo_jax.util.jsonl import read_jsonl
from tests.cli import run_module
from tests.corpus_fixture import make_tiny_corpus, write_real_like

ROOT = os.path.join(os.path.dirname(__file__), "..")


def fake_runner(calls, env_ce):
    """Writes what a finished run leaves behind (config, metrics, eval, summary); no training."""

    def run(spec, resume, log):
        calls.append((spec.name, resume))
        run_dir = RunDir(spec.workdir)
        os.makedirs(run_dir.path, exist_ok=True)
        with open(run_dir.file(RunDir.CONFIG), "w") as f:
            f.write(spec.cfg.to_json())
        value = env_ce(spec)
        for step in (1, 2):
            run_dir.append_metrics({"step": step, "loss": 1.0, "env_ce": value, "action_ce": 2.0})
            line = {"step": step, "wall_s": 0.1}
            for s in ("train", "heldout_tasks", "heldout_scenarios", "real"):
                line.update({f"{s}/env_ce": value + step, f"{s}/env_acc": 0.5})
                line.update({f"{s}/action_ce": 2.0, f"{s}/action_acc": float("nan")})
            evaluation.append_line(run_dir.file(evaluation.EVAL_FILE), line)
        run_dir.write_json("summary.json", {"steps": 2})

    return run


def _base():
    return Config(data=DataConfig(paths=("unused",)), loss=LossConfig())


def test_grid_arms_and_names(tmp_path):
    arms = sweep.arms(["grpo", "echo", "verifier_free"], [0.01, 0.5])
    assert [a.name for a in arms] == ["grpo", "echo_lam0.01", "echo_lam0.5", "verifier_free"]
    specs = sweep.grid(_base(), arms, [0, 1, 2], str(tmp_path))
    assert len(specs) == 12
    assert {s.cfg.loss.lam for s in specs if s.arm.objective != "echo"} == {0.0}
    assert specs[4].workdir == str(tmp_path / "echo_lam0.01_seed1")
    assert specs[4].cfg.train.seed == 1 and specs[4].cfg.loss.lam == 0.01
    # Everything but objective, λ and seed is shared.
    assert len({(s.cfg.data, s.cfg.model, s.cfg.train.steps, s.cfg.eval) for s in specs}) == 1


def test_sweep_skips_resumes_refuses_and_fills_closed_loop(tmp_path):
    specs = sweep.grid(_base(), sweep.arms(["grpo", "echo"], [0.1]), [0, 1], str(tmp_path))
    calls = []
    runner = fake_runner(calls, lambda s: 3.0 if s.arm.objective == "grpo" else 1.0 + s.seed / 10)
    hook_calls = []

    def hook(spec):
        hook_calls.append(spec.name)
        return {"pass@1": 0.5 if spec.arm.objective == "echo" else 0.25, "pass@k": 0.75, "k": 4}

    rows = sweep.run_sweep(specs, runner=runner, log=lambda _: None)
    assert [c[1] for c in calls] == [False] * 4 and all(r["status"] == "done" for r in rows)
    assert rows[0]["pass@1"] is None and rows[0]["heldout_tasks/env_ce"] == 5.0
    assert rows[0]["heldout_tasks/action_acc"] is None  # NaN in eval.jsonl -> empty

    # Finished runs are skipped; an interrupted one (no summary) resumes; the hook runs once each.
    os.remove(os.path.join(specs[3].workdir, "summary.json"))
    calls.clear()
    rows = sweep.run_sweep(specs, runner=runner, closed_loop=hook, log=lambda _: None)
    assert calls == [(specs[3].name, True)]
    assert sorted(hook_calls) == sorted(s.name for s in specs)
    sweep.run_sweep(specs, runner=runner, closed_loop=hook, log=lambda _: None)
    assert len(hook_calls) == 4 and rows[2]["pass@1"] == 0.5 and rows[0]["k"] == 4
    assert all(r["wall_s"] is not None for r in rows)

    # CSV round trip, report and plain findings.
    csv_path = str(tmp_path / "out" / results.CSV_NAME)
    results.write_csv(rows, csv_path)
    back = results.read_csv(csv_path)
    assert [r["arm"] for r in back] == [r["arm"] for r in rows]
    assert back[2]["heldout_scenarios/env_ce"] == pytest.approx(rows[2]["heldout_scenarios/env_ce"])
    assert back[0]["heldout_tasks/action_acc"] is None and back[0]["seed"] == 0
    command = "python -m experiments.sweep X"
    written = ablation_report.write_report(back, str(tmp_path / "out"), command)
    assert {os.path.basename(p) for p in written} >= {
        "ABLATION.md",
        "curves_train.png",
        "curves_heldout.png",
        "env_ce_vs_lambda.png",
        "action_ce_vs_lambda.png",
        "pass1_vs_lambda.png",
    }
    md = (tmp_path / "out" / "ABLATION.md").read_text()
    assert "python -m experiments.sweep X" in md
    assert "**3.050 ± 0.071**" in md  # echo's held-out env CE: best, in bold
    assert "not separable from the seed spread on `heldout_scenarios/action_ce`" in md
    # Held-out env CE 3.05 ± 0.07 (echo) vs 5.0 ± 0 (grpo): a clear gap.
    assert (
        "best echo arm echo λ=0.1 3.050 ± 0.071; vs grpo 5.000: Δ -1.950 ± 0.050 SE, "
        "**better** beyond 2 SE" in md
    )
    assert (
        "pass@1` (higher is better): best echo arm echo λ=0.1 0.500 ± 0.000; vs grpo "
        "0.250: Δ +0.250 ± 0.000 SE, **better** beyond 2 SE" in md
    )

    # A workdir holding another config is refused before anything runs.
    train = dataclasses.replace(specs[0].cfg.train, steps=7)
    changed = [dataclasses.replace(specs[0], cfg=dataclasses.replace(specs[0].cfg, train=train))]
    with pytest.raises(sweep.SweepError, match="different config"):
        sweep.run_sweep(changed, runner=runner, log=lambda _: None)


def test_compare_needs_spread():
    assert results.compare((1.0, 0.1, 3), (2.0, 0.1, 3))[2]
    assert not results.compare((1.0, 0.5, 3), (1.5, 0.5, 3))[2]
    assert not results.compare((1.0, 0.0, 1), (2.0, 0.0, 1))[2]  # one seed: no spread known


def _sweep_cli(*args):
    return run_module("experiments.sweep", *args, timeout=600)


def test_cli_tiny_sweep_end_to_end_and_resume(tmp_path):
    data = make_tiny_corpus(tmp_path / "corpus")
    real = write_real_like(tmp_path / "real.json")
    args = [
        f"--data={data}",
        f"--root={tmp_path / 'runs'}",
        f"--results={tmp_path / 'results'}",
        f"--jax_cache={tmp_path / 'jax_cache'}",
        "--objectives=grpo,echo",
        "--lams=0.1",
        "--seeds=0,1",
        "--steps=2",
        "--eval_every=1",
        "--log_every=1",
        "--checkpoint_every=1",
        "--eval_max_rows=3",
        "--d_model=16",
        "--n_layers=1",
        "--d_ff=32",
        "--max_len=128",
        f"--eval_real={real}",
        f"--cache_dir={tmp_path / 'data_cache'}",
    ]
    page = Path(ROOT) / "docs" / "results.md"
    page_before = page.read_text()
    proc = _sweep_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Results written elsewhere never rewrite the repository's docs page.
    assert page.read_text() == page_before
    rows = results.read_csv(str(tmp_path / "results" / "ablation.csv"))
    assert [(r["arm"], r["seed"], r["status"]) for r in rows] == [
        ("grpo", 0, "done"),
        ("grpo", 1, "done"),
        ("echo_lam0.1", 0, "done"),
        ("echo_lam0.1", 1, "done"),
    ]
    for r in rows:
        assert r["eval_step"] == 2 and np.isfinite(r["heldout_scenarios/env_ce"])
        assert r["pass@1"] is None and r["wall_s"] > 0

    # Interrupt one run after step 1; the rerun resumes only it and evaluates step 2 once.
    wd = rows[3]["workdir"]
    RunDir(wd).manager.delete(2)
    os.remove(os.path.join(wd, "summary.json"))
    proc = _sweep_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("skipped") == 3 and "resuming" in proc.stdout
    assert [m["step"] for m in read_jsonl(os.path.join(wd, "eval.jsonl"))] == [1, 2]

    # --report_only: everything again from the CSV, without training.
    md = (tmp_path / "results" / "ABLATION.md").read_text()
    os.remove(tmp_path / "results" / "ABLATION.md")
    ablation_report.regenerate(str(tmp_path / "results"))
    assert (tmp_path / "results" / "ABLATION.md").read_text() == md
    with open(tmp_path / "results" / "ablation.json") as f:
        assert "--objectives=grpo,echo" in json.load(f)["command"]


def test_agent_hook_calls_the_closed_loop_evaluator(tmp_path, monkeypatch):
    import types

    calls = []

    def evaluate_checkpoint(workdir, split, samples, **kw):
        calls.append((workdir, split, samples, kw))
        return {"pass@1_greedy": 0.25, "pass@1": 0.3, "pass@2": 0.5, "tasks": 4}

    fake = types.SimpleNamespace(evaluate_checkpoint=evaluate_checkpoint)
    monkeypatch.setitem(sys.modules, "echo_jax.agent.closed_loop", fake)
    data = make_tiny_corpus(tmp_path / "corpus")
    base = Config(data=DataConfig(paths=(data,)))
    (spec,) = sweep.grid(base, sweep.arms(["echo"], [0.1]), [0], str(tmp_path / "runs"))
    hook = sweep.agent_closed_loop(split="heldout_scenarios", samples=2, max_tasks=3, worlds="w")
    got = hook(spec)
    assert (got["pass@1"], got["pass@k"], got["k"], got["tasks"]) == (0.25, 0.5, 2, 4)
    assert calls == [
        (
            spec.workdir,
            "heldout_scenarios",
            2,
            {
                "worlds": "w",
                "corpus_dir": data,
                "agent": None,
                "max_tasks": 3,
                "tool_call_positions": 64,
            },
        )
    ]


def test_a_generated_section_is_spliced_between_its_markers(tmp_path):
    page = tmp_path / "results.md"
    begin, end = "<!-- results:begin (generated) -->", "<!-- results:end -->"
    page.write_text(f"intro\n{begin}\nold\n{end}\noutro\n")
    assert splice_section(str(page), "## Results\nnew table\n", "results")
    text = page.read_text()
    assert text == f"intro\n{begin}\n## Results\nnew table\n{end}\noutro\n"
    assert not splice_section(str(page), "x", "performance")
    unmarked = tmp_path / "OTHER.md"
    unmarked.write_text("no markers\n")
    assert not splice_section(str(unmarked), "x", "results")
    assert unmarked.read_text() == "no markers\n"


def test_the_docs_pages_section_links_to_the_results_folder_from_where_the_page_is(tmp_path):
    """docs/results.md sits beside results/, not above it: its links go through '..'."""
    rows = [
        {
            "arm": "grpo",
            "objective": "grpo",
            "lam": 0.0,
            "seed": s,
            "steps": 2,
            "status": "done",
            "heldout_tasks/env_ce": 3.0 + s,
        }  # fmt: skip
        for s in (0, 1)
    ]
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "results.md"
    page.write_text("# Results\n<!-- results:begin -->\n<!-- results:end -->\nafter\n")
    out = str(tmp_path / "results")
    assert ablation_report.write_section(str(page), rows, "python -m experiments.sweep", out)
    text = page.read_text()
    assert "[../results/ABLATION.md](../results/ABLATION.md)" in text
    assert "(../results/env_ce_vs_lambda.png)" in text
    assert "| grpo | 2 | – | 3.500 ± 0.707 |" in text
    assert text.startswith("# Results\n") and text.endswith("<!-- results:end -->\nafter\n")


def test_the_shipped_results_page_has_the_markers():
    text = (Path(ROOT) / "docs" / "results.md").read_text()
    assert "<!-- results:begin" in text and "<!-- results:end -->" in text
