"""A scenario in the real AgentWorldModel-1K format (fixtures/real_world) runs here as in AWM.

Its full_code is a plain FastAPI + SQLAlchemy app that never mounts MCP and whose engine
defaults to outputs/databases/...; the launcher prepares it, so it starts, lists its tools over
MCP, answers calls on the episode's database, and the closed-loop agent completes episodes in it
with verifier rewards.
"""

import shutil
from pathlib import Path

import pytest

from echo_jax.awm.harness import run_episode
from echo_jax.awm.live_world import LiveWorld
from echo_jax.awm.world_format import WorldFormatError, load_worlds
from echo_jax.data.check_data import check
from tests.awm.test_runtime import VERIFY, Scripted, call

ROOT = Path(__file__).parents[2]
REAL = Path(__file__).parent / "fixtures" / "real_world"
SCENARIO = "recipe_platform_7"
WARM_START = ROOT / "data" / "warm_start"


@pytest.fixture(scope="module")
def world():
    return load_worlds(REAL)[SCENARIO]


@pytest.fixture(scope="module")
def live(world):
    live = LiveWorld(world, timeout_s=30.0)
    live.open()
    yield live
    live.close()


def test_fixture_is_real_format(world):
    code = world.full_code
    assert "mcp" not in code.lower()  # Real AWM-1K code never mounts MCP; the launcher does.
    assert 'os.getenv("DATABASE_PATH", "sqlite:///outputs/databases/' in code
    assert "uvicorn.run(app, host=host, port=port)" in code
    assert "example=" in code and "datetime.utcnow" in code
    assert sum(len(g["endpoints"]) for g in world.api_spec["api_groups"]) == 10


def test_folder_with_judge_verifiers_loads_the_pure_code_ones(world):
    assert (REAL / "gen_verifier.jsonl").is_file()
    # Pure-code verifiers (the first of a repeated record), never the judge-mode ones.
    assert all(code.startswith("def verify_task_completion(") for code in world.verifiers.values())
    assert all("mode=ro" in code for code in world.verifiers.values())
    report = check([str(REAL)])
    assert report.ok, report.errors
    assert "1 valid scenarios, 2 tasks" in report.text()


def test_missing_pure_code_file_names_the_judge_file(tmp_path):
    folder = shutil.copytree(REAL, tmp_path / "awm")
    (folder / "gen_verifier.pure_code.jsonl").unlink()
    with pytest.raises(WorldFormatError, match="missing file.*gen_verifier.jsonl holds AWM's LLM"):
        load_worlds(folder)


def test_starts_lists_tools_and_answers_on_the_episode_database(live, world):
    tools = {tool["name"]: tool for tool in live.client.list_tools()}
    spec_tools = {e["operation_id"] for g in world.api_spec["api_groups"] for e in g["endpoints"]}
    assert set(tools) == spec_tools
    assert "cuisine" in tools["search_recipes"]["inputSchema"]["properties"]
    result = live.client.call_tool("search_recipes", {"cuisine": "italian", "max_minutes": 30})
    assert not result.is_error
    assert '"title": "Spaghetti Carbonara"' in result.text
    created = live.client.call_tool("create_collection", {"name": "Probe"})
    assert '"name": "Probe"' in created.text
    import sqlite3

    # The engine used the episode's file, not the code's default path (./outputs/...): the
    # snapshot, taken from the episode's file, holds the new row.
    with sqlite3.connect(live.server.snapshot()) as db:
        assert db.execute("SELECT COUNT(*) FROM collections WHERE name = 'Probe'").fetchone()[0]
    log = live.server.stderr_tail()
    assert "Warning" not in log and "deprecated" not in log.lower(), log  # Starts cleanly.
    live.server.reset()


def test_scripted_episodes_get_verifier_rewards(live, world):
    solve = Scripted(
        call("search_recipes", cuisine="italian", max_minutes=30),
        call("create_collection", name="Weeknight Dinners"),
        call("add_recipe_to_collection", collection_id=2, recipe_id=2),
        VERIFY,
    )
    episode = run_episode(live.server, live.client, world, 0, solve)
    assert episode["step_reward_types"] == ["tool_call_ok"] * 3 + ["complete"]
    assert episode["reward"] == 1.0
    wrong = Scripted(
        call("create_recipe_review", recipe_id=1, rating=4, title="Perfect every time"), VERIFY
    )
    episode = run_episode(live.server, live.client, world, 1, wrong)
    assert episode["step_reward_types"] == ["tool_call_ok", "others"]
    assert episode["steps"][-1]["observation"]["verify_result"]["execution_status"] == "success"


def test_closed_loop_agent_completes_episodes_in_a_real_world(tmp_path):
    from echo_jax.agent.closed_loop import evaluate_checkpoint
    from echo_jax.config import AgentConfig

    metrics = evaluate_checkpoint(
        str(WARM_START),
        "train",
        1,
        worlds=str(REAL),
        corpus_dir=None,  # Every task of the folder: no corpus was ever captured in it.
        agent=AgentConfig(max_new_tokens=24, max_steps=2),
        tool_call_positions=0,
        out=str(tmp_path / "eval"),
    )
    assert metrics["tasks"] == 2 and metrics["episodes"] == 4  # Greedy + 1 sample per task.
    from echo_jax.awm.capture_shards import read_shard

    episodes = list(read_shard(metrics["rollouts"]))
    for episode in episodes:
        assert episode["scenario"] == SCENARIO
        assert len(episode["tools"]) == 10  # The tools the server listed over MCP.
        verify = episode["steps"][-1]["observation"]
        assert verify["verify_result"]["execution_status"] == "success"
        assert episode["reward"] == (1.0 if verify["reward_type"] == "complete" else 0.0)


def test_scripted_capture_without_parameters_is_refused_clearly(tmp_path):
    from tests.cli import run_module

    out = tmp_path / "corpus"
    done = run_module("experiments.capture", f"--worlds={REAL}", f"--out={out}", timeout=120)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "has no parameters for the scripted policies" in done.stderr
    assert "--policy=agent --checkpoint=RUN_DIR" in done.stderr
    assert not out.exists()  # Refused before any server started or file was written.


def test_agent_captures_a_real_world_and_its_episodes_replay(tmp_path):
    from echo_jax.agent.capture import capture_agent_scenario
    from echo_jax.awm.capture import CaptureConfig, run_capture
    from echo_jax.awm.capture_shards import read_shard, shard_path
    from echo_jax.awm.harness import HarnessConfig
    from echo_jax.awm.replay import check_corpus
    from echo_jax.config import AgentConfig

    harness = HarnessConfig(max_tool_calls=2)
    manifest = run_capture(
        CaptureConfig(
            worlds_dir=str(REAL),
            out_dir=str(tmp_path),
            episodes_per_task=1,
            seed=0,
            workers=1,
            harness=harness,
            policy="agent",
            checkpoint=str(WARM_START),
            agent=AgentConfig(max_new_tokens=24),
        ),
        capture_agent_scenario,
    )
    assert manifest["n_episodes"] == 2 and manifest["policy"] == "agent"
    assert manifest["failed_scenarios"] == {} and manifest["failed_episodes"] == {}
    shard = shard_path(tmp_path, SCENARIO)
    episodes = list(read_shard(shard))
    assert [(ep["task_idx"], ep["capture"]["policy"]) for ep in episodes] == [
        (0, "agent"),
        (1, "agent"),
    ]
    for episode in episodes:
        assert episode["steps"][-1]["observation"]["verify_result"]["execution_status"] == "success"
        assert "tokens" in episode["steps"][0]["policy"]  # What the model generated, kept.
    replay = check_corpus(str(REAL), [str(shard)], workers=1, config=harness)
    assert replay == {"replayed": 2, "reproduced": 2, "mismatches": []}


def test_check_data_reports_code_that_cannot_be_prepared(tmp_path):
    import json

    folder = shutil.copytree(REAL, tmp_path / "awm")
    envs = folder / "gen_envs.jsonl"
    record = json.loads(envs.read_text())
    record["full_code"] = record["full_code"].replace("uvicorn.run(app,", "print(app,")
    envs.write_text(json.dumps(record) + "\n")
    report = check([str(folder)])
    assert not report.ok
    assert report.errors == [
        f"{folder}/gen_envs.jsonl: scenario '{SCENARIO}': gen_envs.jsonl full_code cannot be "
        "prepared to run: no `uvicorn.run(app, ...)` call to serve the app from"
    ]
