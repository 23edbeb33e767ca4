"""Behaviour policies against the generated worlds, served in-process (FastAPI TestClient).

The driver below maps a tool name to its REST route through the scenario's api_spec, the way an
AWM loader does; the real runtime serves the same code over MCP in a subprocess.
"""

import json
import os
import shutil
import sqlite3
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from echo_jax.awm import policies
from echo_jax.awm.worldgen import generate_world

SEED = 0
PER_DOMAIN = 2


class InProcessWorld:
    """One scenario's app on a fresh SQLite file; `reset` restores the initial database."""

    def __init__(self, files: dict, scenario: str, tmp_dir: Path):
        def record(file_name: str) -> dict:
            return next(r for r in files[file_name] if r["scenario"] == scenario)

        self.scenario = scenario
        self.initial = tmp_dir / "initial.db"
        self.live = tmp_dir / "live.db"
        _build_database(
            self.initial, record("gen_db.jsonl")["db_schema"], record("gen_sample.jsonl")
        )
        shutil.copy(self.initial, self.live)
        self.endpoints = {
            ep["operation_id"]: ep
            for group in record("gen_spec.jsonl")["api_spec"]["api_groups"]
            for ep in group["endpoints"]
        }
        self.verifiers = {
            r["task_idx"]: r["verification"]["code"]
            for r in files["gen_verifier.pure_code.jsonl"]
            if r["scenario"] == scenario
        }
        self.namespace = _exec_app(record("gen_envs.jsonl")["full_code"], self.live)
        self.client = TestClient(self.namespace["app"], raise_server_exceptions=True)

    def reset(self) -> None:
        self.namespace["engine"].dispose()
        shutil.copy(self.initial, self.live)

    def call(self, tool_name: str, arguments: dict) -> dict:
        endpoint = self.endpoints.get(tool_name)
        if endpoint is None:
            return {
                "tool_name": tool_name,
                "reward_type": "server_error",
                "error": f"Unknown tool: {tool_name}",
            }
        path, query, body = endpoint["path"], {}, {}
        for name, value in arguments.items():
            where = endpoint["request_params"].get(name, {}).get("param_type", "body")
            if where == "path":
                path = path.replace("{" + name + "}", str(value))
            elif where == "query":
                query[name] = value
            else:
                body[name] = value
        response = self.client.request(
            endpoint["method"], path, params=query or None, json=body or None
        )
        text = json.dumps(response.json(), indent=2)
        if response.status_code >= 400:
            return {
                "tool_name": tool_name,
                "reward_type": "api_error",
                "error": (
                    f"Error calling {tool_name}. Status code: {response.status_code}. "
                    f"Response: {response.text}"
                ),
                "status_code": response.status_code,
            }
        return {"tool_name": tool_name, "reward_type": "tool_call_ok", "tool_result": text}

    def verify(self, task_idx: int) -> dict:
        namespace: dict = {}
        exec(self.verifiers[task_idx], namespace)
        return namespace["verify_task_completion"](str(self.initial), str(self.live))

    def run(self, task_idx: int, policy) -> tuple[list[dict], dict]:
        steps: list[dict] = []
        for _ in range(40):
            action = policy.next_action(steps)
            if action["tool_name"] == "verify":
                return steps, self.verify(task_idx)
            steps.append({"action": action, "observation": self.call(**action)})
        raise AssertionError("policy did not terminate")


def _build_database(path: Path, schema: dict, sample: dict) -> None:
    conn = sqlite3.connect(path)
    script = []
    for table in schema["tables"]:
        script += [table["ddl"] + ";", *(i + ";" for i in table["indexes"])]
    for table in sample["sample_data"]["tables"]:
        script += table["insert_statements"]
    conn.executescript("\n".join(script))
    conn.commit()
    conn.close()


def _exec_app(full_code: str, db_path: Path) -> dict:
    old = os.environ.get("DATABASE_PATH")
    os.environ["DATABASE_PATH"] = f"sqlite:///{db_path}"
    try:
        namespace = {"__name__": "awm_world_under_test"}
        exec(compile(full_code, "<world>", "exec"), namespace)
        return namespace
    finally:
        if old is None:
            del os.environ["DATABASE_PATH"]
        else:
            os.environ["DATABASE_PATH"] = old


@pytest.fixture(scope="module")
def files():
    return generate_world(SEED, PER_DOMAIN)


@pytest.fixture(scope="module")
def params(files):
    return {
        (r["scenario"], r["task_idx"]): {"template": r["template"], "params": r["params"]}
        for r in files["echo_task_params.jsonl"]
    }


def _scenarios(files) -> list[str]:
    return [r["name"] for r in files["gen_scenario.jsonl"]]


def _one_per_domain(worlds: dict) -> dict:
    """The first scenario of each domain, for the slower many-episode checks."""
    firsts: dict = {}
    for name, world in worlds.items():
        firsts.setdefault(policies.domain_of(name), (name, world))
    return dict(firsts.values())


@pytest.fixture(scope="module")
def worlds(files, tmp_path_factory):
    made = {}
    for name in _scenarios(files):
        made[name] = InProcessWorld(files, name, tmp_path_factory.mktemp(name))
    return made


def test_solve_completes_every_task_and_untouched_db_does_not(worlds, params):
    for name, world in worlds.items():
        for task_idx in range(10):
            world.reset()
            assert world.verify(task_idx) == {"result": "others"}, (name, task_idx)
            policy = policies.make_policy(name, task_idx, params, "solve", np.random.default_rng(0))
            steps, result = world.run(task_idx, policy)
            assert result == {"result": "complete"}, (name, task_idx, steps[-1])
            assert all("error" not in s["observation"] for s in steps)
            assert len(steps) <= policies.MAX_TOOL_CALLS


@pytest.mark.parametrize("mode", ["skip_step", "give_up", "second_best", "wrong_quantity"])
def test_mistakes_that_never_recover_fail_verification(worlds, params, mode):
    for name, world in _one_per_domain(worlds).items():
        for task_idx in range(10):
            world.reset()
            rng = np.random.default_rng(task_idx)
            steps, result = world.run(
                task_idx, policies.make_policy(name, task_idx, params, mode, rng)
            )
            assert result == {"result": "others"}, (
                name,
                task_idx,
                mode,
                [s["action"] for s in steps],
            )


def test_explore_and_unknown_tool_still_succeed(worlds, params):
    for name, world in _one_per_domain(worlds).items():
        for task_idx in range(10):
            for mode in ("explore", "unknown_tool"):
                world.reset()
                rng = np.random.default_rng(task_idx)
                policy = policies.make_policy(name, task_idx, params, mode, rng)
                steps, result = world.run(task_idx, policy)
                assert result == {"result": "complete"}, (name, task_idx, mode)
                if mode == "unknown_tool":
                    assert any("Unknown tool" in s["observation"].get("error", "") for s in steps)


def test_wrong_id_and_bad_type_produce_real_http_errors(worlds, params):
    statuses = Counter()
    for name, world in _one_per_domain(worlds).items():
        for task_idx in range(10):
            for mode in ("wrong_id", "bad_arg_type"):
                world.reset()
                rng = np.random.default_rng(task_idx)
                steps, _ = world.run(
                    task_idx, policies.make_policy(name, task_idx, params, mode, rng)
                )
                statuses.update(s["observation"].get("status_code") for s in steps)
    assert statuses[404] > 0 and statuses[422] > 0


WRITE_TOOLS = {
    "e_commerce": "add_item_to_cart",
    "clinic": "book_appointment",
    "library": "checkout_copy",
}


def test_same_actions_on_fresh_databases_give_byte_identical_results(files, params, tmp_path):
    """Tool results depend only on the scenario's data (its world_clock included), never on the
    wall clock: replaying an episode's actions on a fresh copy reproduces every observation."""
    for name in _one_per_domain(dict.fromkeys(_scenarios(files))):
        first = InProcessWorld(files, name, _fresh_dir(tmp_path / name / "a"))
        second = InProcessWorld(files, name, _fresh_dir(tmp_path / name / "b"))
        clock = sqlite3.connect(first.initial).execute("SELECT now FROM world_clock").fetchall()
        assert len(clock) == 1
        write_results = []
        for task_idx in range(10):
            first.reset()
            policy = policies.make_policy(name, task_idx, params, "solve", np.random.default_rng(0))
            steps, result = first.run(task_idx, policy)
            assert result == {"result": "complete"}, (name, task_idx)
            first_dump = _dump(first.live)
            time.sleep(0.01)  # a wall-clock stamp would now differ between the two runs
            second.reset()
            replayed = [second.call(**s["action"]) for s in steps]
            for step, observation in zip(steps, replayed, strict=True):
                assert json.dumps(observation) == json.dumps(step["observation"]), (name, task_idx)
                if step["action"]["tool_name"] == WRITE_TOOLS[policies.domain_of(name)]:
                    write_results.append(observation["tool_result"])
            assert _dump(second.live) == first_dump, (name, task_idx)
        assert write_results, name
        assert all(clock[0][0] in result for result in write_results), name
        for world in (first, second):
            world.namespace["engine"].dispose()


def _fresh_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _dump(db_path: Path) -> str:
    conn = sqlite3.connect(db_path)
    try:
        return "\n".join(conn.iterdump())
    finally:
        conn.close()


def test_unknown_ids_answer_404_with_json_detail(worlds):
    probes = {
        "e_commerce": ("list_product_offers", {"product_id": 9999}),
        "clinic": ("list_available_slots", {"provider_id": 9999}),
        "library": ("return_loan", {"loan_id": 9999}),
    }
    for name, world in worlds.items():
        tool, arguments = probes[policies.domain_of(name)]
        observation = world.call(tool, arguments)
        assert observation["status_code"] == 404
        assert "not found" in json.loads(observation["error"].split("Response: ", 1)[1])["detail"]


def test_insufficient_stock_is_a_409(worlds):
    world = next(w for n, w in worlds.items() if n.startswith("e_commerce"))
    world.reset()
    observation = world.call("add_item_to_cart", {"product_offer_id": 1, "quantity": 99})
    assert observation["status_code"] in (400, 409)


def test_policy_terminates_on_error_observations(params):
    name, task_idx = next(iter(params))
    policy = policies.make_policy(name, task_idx, params, "solve", np.random.default_rng(0))
    steps: list[dict] = []
    for _ in range(policies.MAX_TOOL_CALLS + 2):
        action = policy.next_action(steps)
        if action["tool_name"] == "verify":
            break
        steps.append(
            {"action": action, "observation": {"error": "Error calling x. Status code: 500."}}
        )
    assert action == policies.VERIFY_ACTION


def test_mode_mixture_is_mostly_but_not_only_solving():
    rng = np.random.default_rng(0)
    counts = Counter(policies.choose_mode(rng) for _ in range(4000))
    assert set(counts) == set(policies.MODES)
    assert 0.15 < counts["solve"] / 4000 < 0.35


def test_load_task_params_reads_the_world_file(tmp_path, files):
    with open(tmp_path / "echo_task_params.jsonl", "w") as f:
        for row in files["echo_task_params.jsonl"]:
            f.write(json.dumps(row) + "\n")
    table = policies.load_task_params(tmp_path)
    assert len(table) == len(files["echo_task_params.jsonl"])
    assert set(next(iter(table.values()))) == {"template", "params"}
