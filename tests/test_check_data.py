"""`experiments.check_data`: every problem listed with file, line and field; a summary otherwise.
Also the train CLI's answers to bad data and to a workdir holding another run."""

import json
import os
import shutil
from pathlib import Path

from echo_jax.data.check_data import check
from tests.cli import run_module
from tests.test_data import small_episode, write_jsonl

ROOT = Path(__file__).parents[1]
WORLDS = ROOT / "tests" / "awm" / "fixtures" / "tiny_world"


def test_every_episode_error_is_listed_and_exit_is_1(tmp_path):
    bad = dict(small_episode(), reward=float("nan"))
    path = tmp_path / "eps.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps(small_episode()),
                "{oops",
                json.dumps(bad),
                json.dumps(small_episode()),
                json.dumps(dict(small_episode(), steps=[])),
            ]
        )
        + "\n"
    )
    report = check([str(path)])
    assert report.errors == [
        f"{path}:2: field '<json>': invalid JSON: Expecting property name enclosed in double "
        "quotes: line 1 column 2 (char 1)",
        f"{path}:3: field 'reward': not finite: nan",
        f"{path}:5: field 'steps': empty: an episode needs at least one step",
        f"{path}:4: field '<episode>': duplicate (same content as {path}:1)",
    ]
    proc = run_module("experiments.check_data", str(path))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "4 error(s):" in proc.stdout and "error: 4 problem(s) found" in proc.stderr


def test_summary_of_good_episodes():
    report = check([str(ROOT / "data" / "awm_e_commerce_33_task0.json")])
    assert report.ok, report.errors
    text = report.text()
    assert "episodes: 1 valid in 1 file(s); 1 scenarios, 1 (scenario, task) groups, 6 steps" in text
    assert (
        "tokens per role (cl100k): context 288 (15.1%), action 166 (8.7%), env_output 1451" in text
    )
    assert "rewards: min 0, mean 0.000, max 0" in text
    assert "final reward types: others 1 (100%)" in text
    assert "step reward types: tool_call_ok 5 (83%), others 1 (17%)" in text


def test_world_folder_errors_are_listed_per_scenario(tmp_path):
    folder = tmp_path / "worlds"
    shutil.copytree(WORLDS, folder)
    verifiers = folder / "gen_verifier.pure_code.jsonl"
    records = [json.loads(line) for line in verifiers.read_text().splitlines()]
    records[0]["verification"]["code"] = "def verify_task_completion(:\n"  # tiny_shop task 0
    records = [r for r in records if (r["scenario"], r["task_idx"]) != ("tiny_shop_two", 1)]
    verifiers.write_text("".join(json.dumps(r) + "\n" for r in records))
    report = check([str(folder)])
    assert len(report.errors) == 2, report.errors
    assert report.errors[0] == (
        f"{folder}/gen_verifier.pure_code.jsonl: no verifier for scenario 'tiny_shop_two' "
        "task_idx 1 (task at gen_tasks.jsonl:2)"
    )
    assert report.errors[1].startswith(
        f"{folder}/gen_verifier.pure_code.jsonl: scenario 'tiny_shop': task_idx 0 "
        "verification.code does not compile (SyntaxError"
    )
    assert "1 valid scenarios" in report.text()
    (folder / "gen_envs.jsonl").unlink()
    assert check([str(folder)]).errors == [f"{folder}/gen_envs.jsonl: missing file in {folder}"]
    assert check([str(WORLDS)]).ok


def test_train_cli_refuses_bad_data_and_a_workdir_of_another_run(tmp_path):
    bad = write_jsonl(
        tmp_path / "eps.jsonl", [small_episode(), dict(small_episode(), reward=float("nan"))]
    )
    proc = run_module("experiments.train", f"--data={bad}", f"--workdir={tmp_path / 'w'}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"error: {bad}:2: field 'reward': not finite: nan" in proc.stderr
    assert not (tmp_path / "w").exists()  # Nothing written.

    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"loss": {"lam": 0.5}}))
    proc = run_module("experiments.train", f"--workdir={other}", "--resume")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"error: {other} holds a run with a different config (" in proc.stderr
    assert "loss.lam: 0.5 -> 0.05" in proc.stderr
    assert sorted(os.listdir(other)) == ["config.json"]
