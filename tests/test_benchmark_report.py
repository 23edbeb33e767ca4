"""benchmarks.report: which result line becomes the performance table's row."""

import json

from benchmarks import report


def _line(jax_s, cpu="AMD EPYC", cores=2, env=None, date="2026-11-26T09:00:00+00:00"):
    machine = {"cpu": cpu, "cores": cores, "jax": "0.10.2", "load_avg_1m": 1.0, "date": date}
    machine["git_commit"] = "abc1234"
    if env is not None:
        machine["env"] = env
    return {
        "benchmark": "train_step_vs_torch",
        "config": {"preset": "small", "loss_impl": "auto -> chunked"},
        "results": {"jax": {"median_s": jax_s, "params": 3_671_296}, "torch": {"median_s": 1.5}},
        "machine": machine,
    }


def _rows(tmp_path, monkeypatch, lines):
    monkeypatch.setattr(report, "RESULTS", str(tmp_path))
    with open(tmp_path / "train_step_vs_torch.jsonl", "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    return [(row, report.machine(record)) for _, row, record in report.latest_rows()]


def test_the_newest_line_of_a_configuration_on_one_machine_is_its_row(tmp_path, monkeypatch):
    rows = _rows(tmp_path, monkeypatch, [_line(0.5), _line(1.2)])
    assert len(rows) == 1
    (config, figure, target, met), _ = rows[0]
    assert figure.startswith("1.25x") and target == ">= 1.5x" and met is False


def test_another_machine_gets_a_row_of_its_own(tmp_path, monkeypatch):
    rows = _rows(tmp_path, monkeypatch, [_line(1.2), _line(0.9, cpu="Xeon", cores=16)])
    assert [met for (_, _, _, met), _ in rows] == [False, True]
    assert "Xeon, 16 cores" in rows[1][1]
    assert rows[1][1].endswith("; 2026-11-26; abc1234")  # Which code the figure is for.


def test_the_trainers_call_and_one_step_per_call_are_both_shown(tmp_path, monkeypatch):
    line = _line(0.9)
    line["config"]["steps_per_call"] = 4
    line["speedup_one_step_per_call"] = 1.45
    (((_, figure, _, met), _),) = _rows(tmp_path, monkeypatch, [line])
    assert figure == "1.67x PyTorch's tokens/s; 4 steps per call, 1.45x at one" and met


def test_a_tuned_environment_is_a_comparison_row_beside_the_default(tmp_path, monkeypatch):
    tuned = _line(0.5, env={"GLIBC_TUNABLES": "glibc.malloc.arena_max=1"})
    rows = _rows(tmp_path, monkeypatch, [_line(1.2), tuned])
    assert [(target, met) for (_, _, target, met), _ in rows] == [
        (">= 1.5x", False),
        ("(comparison)", None),
    ]
    assert "GLIBC_TUNABLES=glibc.malloc.arena_max=1" in rows[1][1]


def test_the_table_is_written_into_the_docs_page_between_its_markers(tmp_path):
    page = tmp_path / "performance.md"
    begin, end = "<!-- performance:begin (x) -->", "<!-- performance:end -->"
    page.write_text(f"# Performance\n{begin}\nold\n{end}\n")
    assert report.write_page("| a | b |", str(page))
    assert page.read_text() == f"# Performance\n{begin}\n| a | b |\n{end}\n"
    unmarked = tmp_path / "other.md"
    unmarked.write_text("no markers\n")
    assert not report.write_page("| a |", str(unmarked)) and unmarked.read_text() == "no markers\n"


def test_the_shipped_performance_page_has_the_markers():
    with open(report.PAGE) as f:
        text = f.read()
    assert "<!-- performance:begin" in text and "<!-- performance:end -->" in text
