"""The world generator: AWM-1K file format, determinism, coverage, and self-contained verifiers."""

import ast
import inspect
import json
import re
import sqlite3
from collections import defaultdict
from pathlib import Path

import pytest

from echo_jax.awm import policies, solvers
from echo_jax.awm.launcher import prepare_server_code
from echo_jax.awm.worldgen import DOMAINS, FILES, generate_world, write_world

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "data" / "awm_worlds"
CAPTURE = REPO / "data" / "awm_e_commerce_33_task0.json"
PER_DOMAIN = 12
AWM_KEYS = {
    "gen_scenario.jsonl": {"name", "description"},
    "gen_tasks.jsonl": {"scenario", "tasks"},
    "gen_db.jsonl": {"scenario", "db_schema"},
    "gen_sample.jsonl": {"scenario", "sample_data"},
    "gen_spec.jsonl": {"scenario", "api_spec"},
    "gen_envs.jsonl": {"scenario", "full_code"},
    "gen_verifier.pure_code.jsonl": {"scenario", "task_idx", "task", "verification"},
    "echo_task_params.jsonl": {"scenario", "task_idx", "template", "params"},
}
ALLOWED_VERIFIER_IMPORTS = {"sqlite3", "json", "math"}


@pytest.fixture(scope="module")
def files():
    return generate_world(0, PER_DOMAIN)


def _by_scenario(records: list[dict]) -> dict[str, dict]:
    return {r.get("scenario", r.get("name")): r for r in records}


def _build_db(path: Path, files: dict, scenario: str) -> None:
    schema = _by_scenario(files["gen_db.jsonl"])[scenario]["db_schema"]
    sample = _by_scenario(files["gen_sample.jsonl"])[scenario]["sample_data"]
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA foreign_keys = ON")
    for table in schema["tables"]:
        conn.execute(table["ddl"])
        for index in table["indexes"]:
            conn.execute(index)
    for table in sample["tables"]:
        for statement in table["insert_statements"]:
            conn.execute(statement)
    conn.commit()
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    conn.close()


def test_same_seed_gives_byte_identical_files(tmp_path):
    first = write_world(tmp_path / "a", seed=3, scenarios_per_domain=2)
    second = write_world(tmp_path / "b", seed=3, scenarios_per_domain=2)
    other = write_world(tmp_path / "c", seed=4, scenarios_per_domain=2)
    for name in FILES:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "gen_sample.jsonl").read_bytes() != (other / "gen_sample.jsonl").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no temp leftovers


def test_committed_world_matches_generator(files):
    if not COMMITTED.exists():
        pytest.skip("data/awm_worlds not generated")
    for name in FILES:
        lines = (COMMITTED / name).read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in lines] == files[name], name


def test_every_file_has_awm_keys_and_normalised_names(files):
    for name, keys in AWM_KEYS.items():
        assert files[name], name
        for record in files[name]:
            assert set(record) == keys, name
            assert re.fullmatch(r"[a-z0-9_]+", record.get("scenario", record.get("name")))


def test_coverage_scenarios_domains_tasks(files):
    names = [r["name"] for r in files["gen_scenario.jsonl"]]
    assert len(names) == len(set(names)) >= 30
    assert {policies.domain_of(n) for n in names} == {d.PREFIX for d in DOMAINS}
    assert len(DOMAINS) >= 3
    for name in AWM_KEYS:
        if name not in ("gen_verifier.pure_code.jsonl", "echo_task_params.jsonl"):
            assert sorted(_by_scenario(files[name])) == sorted(names), name
    tasks = _by_scenario(files["gen_tasks.jsonl"])
    for kind in ("gen_verifier.pure_code.jsonl", "echo_task_params.jsonl"):
        keys = sorted((r["scenario"], r["task_idx"]) for r in files[kind])
        assert keys == sorted((n, i) for n in names for i in range(10)), kind
    for r in files["gen_verifier.pure_code.jsonl"]:
        assert len(tasks[r["scenario"]]["tasks"]) == 10
        assert r["task"] == tasks[r["scenario"]]["tasks"][r["task_idx"]]
    for r in files["echo_task_params.jsonl"]:
        assert r["template"] in solvers.SOLVERS


def test_scenarios_of_a_domain_hold_different_data_and_tasks(files):
    per_domain = defaultdict(list)
    for r in files["gen_sample.jsonl"]:
        per_domain[policies.domain_of(r["scenario"])].append(json.dumps(r["sample_data"]))
    for samples in per_domain.values():
        assert len(set(samples)) == len(samples)
    task_lists = [tuple(r["tasks"]) for r in files["gen_tasks.jsonl"]]
    assert len(set(task_lists)) == len(task_lists)
    for r in files["gen_tasks.jsonl"]:
        assert len(set(r["tasks"])) == 10


def test_server_code_is_a_real_format_fastapi_app(files):
    for r in files["gen_envs.jsonl"]:
        code = r["full_code"]
        ast.parse(code)
        assert 'os.environ.get("DATABASE_PATH"' in code
        assert "mcp" not in code.lower().replace("mcp tool name", "")  # The launcher mounts it.
        prepare_server_code(code, scenario=r["scenario"], database_url="sqlite:///x.db")
        assert 'if __name__ == "__main__":' in code
        assert 'uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT"' in code


def test_spec_lists_every_tool_the_policies_use(files):
    used: dict[str, set[str]] = {
        d: {t for t, _ in calls} for d, calls in policies.EXPLORE_CALLS.items()
    }
    sources = {inspect.getsourcefile(solve) for solve in solvers.SOLVERS.values()}
    solver_tools = [
        tool
        for source in sources
        for tool in re.findall(r'Call\(\s*"(\w+)"', Path(source).read_text())
    ]
    for r in files["gen_spec.jsonl"]:
        endpoints = [e for g in r["api_spec"]["api_groups"] for e in g["endpoints"]]
        tools = [e["operation_id"] for e in endpoints]
        assert len(tools) == len(set(tools)) >= 8
        assert used[policies.domain_of(r["scenario"])] <= set(tools)
        for endpoint in endpoints:
            assert endpoint["method"] in {"GET", "POST", "PATCH", "DELETE"}
            for param in endpoint["request_params"].values():
                assert param["param_type"] in {"path", "query", "body"}
    all_tools = {
        e["operation_id"]
        for r in files["gen_spec.jsonl"]
        for g in r["api_spec"]["api_groups"]
        for e in g["endpoints"]
    }
    assert set(solver_tools) <= all_tools


def test_ecommerce_tools_mirror_the_real_capture(files):
    captured = set(json.loads(CAPTURE.read_text())["tools"])
    spec = next(r for r in files["gen_spec.jsonl"] if r["scenario"].startswith("e_commerce"))
    tools = {e["operation_id"] for g in spec["api_spec"]["api_groups"] for e in g["endpoints"]}
    assert tools <= captured and len(tools) >= 10
    add = next(
        e
        for g in spec["api_spec"]["api_groups"]
        for e in g["endpoints"]
        if e["operation_id"] == "add_item_to_cart"
    )
    assert set(add["request_params"]) == {"product_offer_id", "quantity"}


def test_verifiers_import_only_the_allowed_stdlib(files):
    for r in files["gen_verifier.pure_code.jsonl"]:
        tree = ast.parse(r["verification"]["code"])
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported.add((node.module or "").split(".")[0])
        assert imported <= ALLOWED_VERIFIER_IMPORTS, imported
        functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert "verify_task_completion" in functions


def test_databases_build_and_untouched_state_never_verifies(files, tmp_path):
    verifiers = defaultdict(dict)
    for r in files["gen_verifier.pure_code.jsonl"]:
        verifiers[r["scenario"]][r["task_idx"]] = r["verification"]["code"]
    for name, codes in verifiers.items():
        db = tmp_path / f"{name}.db"
        _build_db(db, files, name)
        for task_idx, code in codes.items():
            namespace: dict = {}
            exec(code, namespace)
            assert namespace["verify_task_completion"](str(db), str(db)) == {"result": "others"}, (
                name,
                task_idx,
            )


def test_every_scenario_has_a_world_clock_consistent_with_its_data(files, tmp_path):
    """One world_clock row per scenario: after every stamp in its data, before clinic slots, and
    on the library's own "today" (its loans fall due around it)."""
    for r in files["gen_scenario.jsonl"]:
        name = r["name"]
        db = tmp_path / f"{name}.db"
        _build_db(db, files, name)
        conn = sqlite3.connect(db)
        clock = conn.execute("SELECT id, now FROM world_clock").fetchall()
        assert len(clock) == 1 and clock[0][0] == 1, name
        now = clock[0][1]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", now), now
        stamps = []
        for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
            columns = [c[1] for c in conn.execute(f"PRAGMA table_info({table})")]
            for column in columns:
                if column.endswith("_at"):
                    stamps += [v for (v,) in conn.execute(f"SELECT {column} FROM {table}") if v]
        assert stamps and max(stamps) < now, (name, max(stamps), now)
        domain = policies.domain_of(name)
        if domain == "clinic":
            (first_slot,) = conn.execute("SELECT MIN(start_time) FROM appointment_slots").fetchone()
            assert now < first_slot, name
        if domain == "library":
            dues = [d for (d,) in conn.execute("SELECT due_date FROM loans WHERE status='active'")]
            assert min(dues) <= now[:10] < max(dues), name
        conn.close()


def test_servers_never_read_the_wall_clock(files):
    for r in files["gen_envs.jsonl"]:
        code = r["full_code"]
        assert "world_clock" in code
        for banned in ("datetime.now", "date.today", "time.time", "utcnow"):
            assert banned not in code, (r["scenario"], banned)
