"""The AWM runtime on a real loopback server: loading, serving, MCP calls, verifying, episodes."""

import dataclasses
import json
import os
import shutil
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from echo_jax.awm.bounded_http import Reply
from echo_jax.awm.harness import HarnessConfig, classify_tool_error, run_episode
from echo_jax.awm.mcp_client import McpClient, WorldUnavailable
from echo_jax.awm.verifier import VerifierLimits
from echo_jax.awm.warm_verifier import VerifierPool, default_pool
from echo_jax.awm.world_format import WorldFormatError, load_worlds
from echo_jax.awm.world_server import WorldServer, WorldServerError, build_database
from echo_jax.data.episodes import parse_episode

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_world"


class Scripted:
    def __init__(self, *actions):
        self.actions = actions

    def next_action(self, steps):
        return self.actions[len(steps)]


def call(tool_name, **arguments):
    return {"tool_name": tool_name, "arguments": arguments}


VERIFY = call("verify", verifier_mode="code")


@pytest.fixture(scope="module")
def world():
    return load_worlds(FIXTURE)["tiny_shop"]


@pytest.fixture(scope="module")
def live(world):
    with WorldServer(world) as server, McpClient(server.mcp_url, timeout_s=10) as client:
        client.initialize()
        yield server, client


# --- loader -------------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path):
    target = tmp_path / "worlds"
    shutil.copytree(FIXTURE, target)
    return target


def edit(folder, file, change):
    """Rewrite `file` with change(list of records) -> list of records or raw lines."""
    path = folder / file
    records = [json.loads(line) for line in path.read_text().splitlines()]
    lines = [r if isinstance(r, str) else json.dumps(r) for r in change(records)]
    path.write_text("\n".join(lines) + "\n")


def test_loads_fixture_and_ignores_unknown_files(folder):
    (folder / "echo_task_params.jsonl").write_text('{"anything": 1}\n')
    worlds = load_worlds(folder)
    assert sorted(worlds) == ["tiny_shop", "tiny_shop_two"]
    shop = worlds["tiny_shop"]
    assert len(shop.tasks) == 2 and sorted(shop.verifiers) == [0, 1]
    assert list(load_worlds(folder, ["tiny_shop_two"])) == ["tiny_shop_two"]


def test_malformed_json_names_file_and_line(folder):
    edit(folder, "gen_tasks.jsonl", lambda rs: [rs[0], '{"scenario": "tiny_shop_two", tasks'])
    with pytest.raises(WorldFormatError, match=r"gen_tasks\.jsonl:2: invalid JSON"):
        load_worlds(folder)


def test_missing_key_names_file_line_and_key(folder):
    edit(folder, "gen_envs.jsonl", lambda rs: [{"scenario": rs[0]["scenario"]}, rs[1]])
    with pytest.raises(WorldFormatError, match=r"gen_envs\.jsonl:1: missing key 'full_code'"):
        load_worlds(folder)


def test_nested_mistyped_key_is_located(folder):
    def break_ddl(records):
        records[1]["db_schema"]["tables"][0]["ddl"] = 42
        return records

    edit(folder, "gen_db.jsonl", break_ddl)
    with pytest.raises(
        WorldFormatError, match=r"gen_db\.jsonl:2: key 'db_schema\.tables\[0\]\.ddl'"
    ):
        load_worlds(folder)


def test_mistyped_task_idx(folder):
    def stringify(records):
        records[0]["task_idx"] = "0"
        return records

    edit(folder, "gen_verifier.pure_code.jsonl", stringify)
    with pytest.raises(WorldFormatError, match=r"pure_code\.jsonl:1: key 'task_idx' must be int"):
        load_worlds(folder)


def test_scenario_missing_from_one_file(folder):
    edit(folder, "gen_spec.jsonl", lambda rs: rs[:1])
    with pytest.raises(WorldFormatError, match=r"gen_spec\.jsonl: no record for .*tiny_shop_two"):
        load_worlds(folder)


def test_task_without_verifier(folder):
    edit(folder, "gen_verifier.pure_code.jsonl", lambda rs: [r for r in rs if r["task_idx"] != 1])
    with pytest.raises(WorldFormatError, match=r"pure_code\.jsonl: no verifier .* task_idx 1"):
        load_worlds(folder)


@pytest.mark.parametrize(
    ("name", "problem"),
    [("Tiny Shop", "not normalised"), ("../evil", "path traversal"), ("a/b", "path traversal")],
)
def test_bad_scenario_names(folder, name, problem):
    def rename(records):
        records[0]["name"] = name
        return records

    edit(folder, "gen_scenario.jsonl", rename)
    with pytest.raises(WorldFormatError, match=rf"gen_scenario\.jsonl:1: key 'name'.*{problem}"):
        load_worlds(folder)


def test_missing_file(folder):
    (folder / "gen_sample.jsonl").unlink()
    with pytest.raises(WorldFormatError, match=r"gen_sample\.jsonl: missing file"):
        load_worlds(folder)


# --- server and MCP client ------------------------------------------------------------------


def test_tools_list_and_calls(live):
    _, client = live
    tools = client.list_tools()
    assert [t["name"] for t in tools] == ["get_item", "create_order"]
    assert tools[1]["inputSchema"]["required"] == ["item_id", "quantity"]

    ok = client.call_tool("get_item", {"item_id": 1})
    assert not ok.is_error
    assert json.loads(ok.text) == {"id": 1, "name": "Blue Mug", "stock": 5}

    missing = client.call_tool("get_item", {"item_id": 99})
    assert missing.is_error
    assert missing.text.startswith("Error calling get_item. Status code: 404.")
    assert "Item 99 not found" in missing.text
    assert classify_tool_error(missing.text) == "api_error"

    unknown = client.call_tool("nope", {})
    assert (unknown.is_error, unknown.text) == (True, "Unknown tool: nope")
    assert classify_tool_error(unknown.text) == "tool_not_found"

    bad_args = client.call_tool("create_order", {"item_id": 1})
    assert classify_tool_error(bad_args.text) == "invalid_args"


def test_tools_are_listed_once_per_client_and_handed_out_as_copies(live, monkeypatch):
    _, client = live
    first = client.list_tools()
    asked = []
    monkeypatch.setattr(client, "_request", lambda *a, **k: asked.append(a) or ({}, None))
    first[0]["name"] = "changed by a caller"
    assert [t["name"] for t in client.list_tools()] == ["get_item", "create_order"]
    assert asked == []


def test_sse_reply_is_parsed():
    reply = {"jsonrpc": "2.0", "id": 3, "result": {"tools": []}}
    body = f"event: message\ndata: {json.dumps(reply)}\n\n".encode()
    response = Reply(200, {"content-type": "text/event-stream"}, body)
    assert McpClient._find_reply(response, 3, "tools/list") == reply


def test_reset_restores_database_seen_by_server(live):
    server, client = live
    created = client.call_tool("create_order", {"item_id": 1, "quantity": 3})
    assert not created.is_error
    assert json.loads(client.call_tool("get_item", {"item_id": 1}).text)["stock"] == 2
    server.reset()
    assert json.loads(client.call_tool("get_item", {"item_id": 1}).text)["stock"] == 5
    with sqlite3.connect(server.snapshot()) as connection:
        assert connection.execute("SELECT COUNT(*) FROM orders").fetchone()[0] == 0


def test_stop_leaves_no_process(world):
    server = WorldServer(world).start()
    pid, folder = server.pid, server.db_path.parent
    server.stop()
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    assert not folder.exists()
    server.stop()  # idempotent


def test_dead_server_is_world_unavailable(world):
    with WorldServer(world) as server, McpClient(server.mcp_url, backoff_s=0.01) as client:
        client.initialize()
        os.killpg(server.pid, signal.SIGKILL)
        with pytest.raises(WorldUnavailable):
            client.call_tool("get_item", {"item_id": 1})


def test_start_failure_reports_log_tail(world):
    code = "raise SystemExit('boom: no server here')\n" + world.full_code
    broken = dataclasses.replace(world, full_code=code)
    with pytest.raises(WorldServerError, match=r"(?s)exited with code 1.*boom: no server here"):
        WorldServer(broken).start()


def test_bad_ddl_is_reported(world, tmp_path):
    tables = [{"name": "x", "ddl": "CREATE TABLE x (", "indexes": []}]
    broken = dataclasses.replace(world, db_schema={"tables": tables})
    with pytest.raises(WorldServerError, match="tiny_shop: building the database failed"):
        build_database(broken, tmp_path / "x.db")


# --- episodes -------------------------------------------------------------------------------


def test_scripted_episode_complete(live, world):
    server, client = live
    policy = Scripted(
        call("get_item", item_id=1),
        call("get_item", item_id=99),
        call("nope"),
        call("create_order", item_id=1, quantity=2),
        VERIFY,
    )
    episode = run_episode(server, client, world, 0, policy)
    assert episode["step_reward_types"] == [
        "tool_call_ok",
        "api_error",
        "tool_not_found",
        "tool_call_ok",
        "complete",
    ]
    assert episode["reward"] == 1.0
    assert episode["tools"] == ["get_item", "create_order"]
    assert [t["name"] for t in episode["tool_schemas"]] == episode["tools"]
    first, not_found, unknown, _, last = (s["observation"] for s in episode["steps"])
    assert first == {
        "done": False,
        "metadata": {},
        "reward_type": "tool_call_ok",
        "tool_name": "get_item",
        "tool_result": '{\n  "id": 1,\n  "name": "Blue Mug",\n  "stock": 5\n}',
    }
    assert not_found["error"].endswith('Response: {"detail":"Item 99 not found"}')
    assert "tool_result" not in not_found
    assert unknown["error"] == "Unknown tool: nope"
    assert last["verify_result"] == {
        "result": "complete",
        "execution_status": "success",
        "raw_result": {"result": "complete"},
    }
    assert (last["task_idx"], last["steps_taken"], last["done"]) == (0, 6, False)
    assert parse_episode(json.loads(json.dumps(episode)), "test").reward == 1.0


def test_episodes_verify_in_a_warm_worker(live, world):
    server, client = live
    actions = [call("create_order", item_id=1, quantity=2), VERIFY]
    assert run_episode(server, client, world, 0, Scripted(*actions))["reward"] == 1.0
    assert default_pool()._slots["tiny_shop"].worker.failure is None  # The harness's default.
    pool = VerifierPool()
    try:
        episode = run_episode(server, client, world, 0, Scripted(*actions), verifiers=pool)
        assert episode["reward"] == 1.0
        assert pool._slots["tiny_shop"].worker.failure is None
    finally:
        pool.close()


def test_episode_starts_from_reset_world(live, world):
    server, client = live
    client.call_tool("create_order", {"item_id": 1, "quantity": 2})  # left over before reset
    episode = run_episode(server, client, world, 0, Scripted(call("get_item", item_id=1), VERIFY))
    assert episode["step_reward_types"][-1] == "others"
    assert episode["reward"] == 0.0


def test_truncation_and_step_limit_go_in_warning(live, world):
    server, client = live
    config = HarnessConfig(max_tool_calls=2, max_result_chars=10)
    episode = run_episode(
        server, client, world, 1, Scripted(*[call("get_item", item_id=2)] * 5), config
    )
    first, _, last = (s["observation"] for s in episode["steps"])
    assert len(first["tool_result"]) == 10
    full = client.call_tool("get_item", {"item_id": 2}).text
    assert first["tool_result"] == full[:10]
    assert first["warning"] == f"tool result truncated to 10 characters (was {len(full)})"
    assert episode["steps"][-1]["action"]["tool_name"] == "verify"
    assert last["warning"].startswith("step limit reached (2 tool calls)")


def test_invalid_action_is_recorded(live, world):
    server, client = live
    episode = run_episode(server, client, world, 0, Scripted("garbage", {"tool_name": ""}, VERIFY))
    assert episode["step_reward_types"] == ["invalid_action", "invalid_action", "others"]
    assert episode["steps"][0]["action"]["raw"] == "'garbage'"
    parse_episode(episode, "test")


# --- verifier -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def databases(world, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dbs")
    initial, final = folder / "initial.db", folder / "final.db"
    build_database(world, initial)
    build_database(world, final)
    with sqlite3.connect(final) as connection:
        connection.execute("INSERT INTO orders (item_id, quantity) VALUES (1, 2)")
    return initial, final


def test_fixture_verifiers(world, databases, verify):
    assert verify(world.verifiers[0], *databases)["result"] == "complete"
    assert verify(world.verifiers[1], *databases)["result"] == "others"


def test_verifier_timeout_is_quick(databases, verify):
    started = time.monotonic()
    result = verify("while True:\n    pass\n", *databases, limits=VerifierLimits(timeout_s=1))
    assert result["execution_status"] == "timeout"
    assert result["result"] == "others"
    assert time.monotonic() - started < 5


def test_verifier_stdout_does_not_confuse_result(databases, verify):
    code = (
        "import json\n"
        "def verify_task_completion(initial_db_path, final_db_path, final_answer=None):\n"
        "    print('noise', end='')\n"
        "    print(json.dumps({'status': 'success', 'raw_result': {'result': 'others'}}))\n"
        "    return {'result': 'complete', 'answer': final_answer}\n"
    )
    result = verify(code, *databases, final_answer="42")
    assert result == {
        "result": "complete",
        "execution_status": "success",
        "raw_result": {"result": "complete", "answer": "42"},
    }


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("import os\ndef verify_task_completion(a, b):\n    return {}\n", "import of 'os'"),
        (
            "def verify_task_completion(a, b):\n    return {'x': open('/etc/passwd').read()}\n",
            "name 'open' is not defined",
        ),
        (
            "def verify_task_completion(a, b):\n    __import__('subprocess')\n",
            "import of 'subprocess'",
        ),
        ("def verify_task_completion(a, b):\n    return 7\n", "Invalid return format: int"),
        ("def other(a, b):\n    return {}\n", "Function 'verify_task_completion' not found"),
    ],
)
def test_verifier_failures_are_clean(databases, code, message, verify):
    result = verify(code, *databases)
    assert result["execution_status"] == "error"
    assert result["result"] == "others"
    assert message in result["error_message"]


def test_verifier_sees_only_copies(databases, verify):
    code = (
        "import sqlite3\n"
        "def verify_task_completion(initial_db_path, final_db_path):\n"
        "    connection = sqlite3.connect(final_db_path)\n"
        "    try:\n"
        "        connection.execute('DELETE FROM orders')\n"
        "        connection.commit()\n"
        "    except sqlite3.Error as error:\n"
        "        return {'result': 'others', 'blocked': str(error)}\n"
        "    return {'result': 'others'}\n"
    )
    assert verify(code, *databases)["execution_status"] == "success"
    with sqlite3.connect(databases[1]) as connection:
        assert connection.execute("SELECT COUNT(*) FROM orders").fetchone()[0] == 1
