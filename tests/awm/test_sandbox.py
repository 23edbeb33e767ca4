"""Untrusted code: known verifier-sandbox escapes fail, servers and verifiers see no secrets,
and no world server outlives a parent that is SIGKILLed."""

import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from echo_jax.awm.world_format import load_worlds
from echo_jax.awm.world_server import WorldServer, build_database

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_world"
ROOT = Path(__file__).parents[2]

# The real `os` module's globals, the classic way: object.__subclasses__() -> os._wrap_close.
OS = (
    "[c for c in ().__class__.__base__.__subclasses__() "
    "if c.__name__ == '_wrap_close'][0].__init__.__globals__"
)
REAL_BUILTINS = f"{OS}['__builtins__']"


def verifier(body: str) -> str:
    lines = "\n".join(f"    {line}" for line in body.strip().splitlines())
    head = "import sqlite3, json\ndef verify_task_completion(initial_db_path, final_db_path):\n"
    return head + lines + "\n"


@pytest.fixture(scope="module")
def world():
    return load_worlds(FIXTURE)["tiny_shop"]


@pytest.fixture(scope="module")
def databases(world, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dbs")
    initial, final = folder / "initial.db", folder / "final.db"
    build_database(world, initial)
    build_database(world, final)
    return initial, final


def blocked(result: dict, what: str) -> None:
    assert result["execution_status"] == "error", result
    assert result["result"] == "others"
    assert what in result["error_message"], result["error_message"]


ESCAPES = {
    "builtin_open": ("return {'x': open('/etc/hostname').read()}", "name 'open' is not defined"),
    "real_builtins_open": (
        f"return {{'x': {REAL_BUILTINS}['open']('/etc/hostname').read()}}",
        "blocked by the verifier sandbox: open('/etc/hostname', 'r')",
    ),
    "io_open": (
        f"return {{'x': {REAL_BUILTINS}['__import__']('io').open('/etc/hostname').read()}}",
        "blocked by the verifier sandbox: open('/etc/hostname', 'r')",
    ),
    "codecs_open_via_json_module": (
        "return {'x': json.codecs.open('/etc/hostname').read()}",
        "blocked by the verifier sandbox: open('/etc/hostname'",
    ),
    "os_open": (
        f"return {{'x': {OS}['open']('/etc/hostname', 0)}}",
        "blocked by the verifier sandbox: open('/etc/hostname', None)",
    ),
    "proc_self_environ": (
        f"return {{'x': {REAL_BUILTINS}['open']('/proc/self/environ', 'rb').read().decode()}}",
        "blocked by the verifier sandbox: open('/proc/self/environ'",
    ),
    "import_os": ("import os\nreturn {}", "import of 'os' is not allowed"),
    "real_import_subprocess": (
        f"{REAL_BUILTINS}['__import__']('subprocess')\nreturn {{}}",
        "blocked by the verifier sandbox: import of 'subprocess'",
    ),
    "os_system_via_subclasses": (
        f"{OS}['system']('touch {{marker}}')\nreturn {{}}",
        "blocked by the verifier sandbox: os.system",
    ),
    "os_popen_via_subclasses": (
        f"{OS}['popen']('touch {{marker}}').read()\nreturn {{}}",
        "blocked by the verifier sandbox: import of 'subprocess'",
    ),
    "os_fork": (f"{OS}['fork']()\nreturn {{}}", "blocked by the verifier sandbox: os.fork"),
    "os_posix_spawn": (
        f"{OS}['posix_spawn']('/bin/touch', ['touch', '{{marker}}'], {{}})\nreturn {{}}",
        "blocked by the verifier sandbox: os.posix_spawn",
    ),
    "os_execv": (
        f"{OS}['execv']('/bin/touch', ['touch', '{{marker}}'])\nreturn {{}}",
        "blocked by the verifier sandbox: os.exec",
    ),
    "ctypes": (
        f"{REAL_BUILTINS}['__import__']('ctypes')\nreturn {{}}",
        "blocked by the verifier sandbox: import of 'ctypes'",
    ),
    "list_directory": (
        f"return {{'x': {OS}['listdir']('/')}}",
        "blocked by the verifier sandbox: os.listdir('/')",
    ),
    "remove_file": (
        f"{OS}['remove'](final_db_path)\nreturn {{}}",
        "blocked by the verifier sandbox: os.remove",
    ),
    "write_database": (
        "c = sqlite3.connect(final_db_path)\nc.execute('DELETE FROM orders')\nc.commit()\n"
        "return {}",
        "attempt to write a readonly database",
    ),
    "raw_sqlite_connect_read_write": (
        "c = sqlite3.dbapi2.Connection(final_db_path)\nc.execute('DELETE FROM orders')\n"
        "c.commit()\nreturn {}",
        "blocked by the verifier sandbox: sqlite3.connect",
    ),
    "open_other_database": (
        "sqlite3.connect('/tmp/other.db')\nreturn {}",
        "only initial_db_path and final_db_path can be opened",
    ),
    "vacuum_into_new_file": (
        "sqlite3.connect(final_db_path).execute(\"VACUUM INTO '{marker}'\")\nreturn {}",
        "too many attached databases",
    ),
    "attach_new_file": (
        "sqlite3.connect(final_db_path).execute(\"ATTACH '{marker}' AS x\")\nreturn {}",
        "too many attached databases",
    ),
    "load_extension": (
        "sqlite3.connect(final_db_path).enable_load_extension(True)\nreturn {}",
        # Refused by the audit hook, or absent where Python's sqlite3 is built without it.
        "enable_load_extension",
    ),
}


@pytest.mark.parametrize("name", list(ESCAPES))
def test_known_escape_fails(name, databases, tmp_path, verify):
    body, message = ESCAPES[name]
    marker = tmp_path / "escaped"
    os.chmod(tmp_path, 0o777)  # Were the verifier not stopped, its user id could write here.
    result = verify(verifier(body.replace("{marker}", str(marker))), *databases)
    blocked(result, message)
    assert not marker.exists()
    with sqlite3.connect(databases[1]) as connection:
        assert connection.execute("SELECT COUNT(*) FROM items").fetchone()[0] > 0


def test_verifier_runs_unprivileged_without_secrets(databases, monkeypatch, verify):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    code = verifier(
        f"""
os = {OS}
return {{'result': 'others', 'env': dict(os['environ']), 'uid': os['getuid']()}}
"""
    )
    result = verify(code, *databases)
    assert result["execution_status"] == "success", result
    raw = result["raw_result"]
    assert "SECRET_TOKEN" not in raw["env"] and "hunter2" not in json.dumps(raw)
    assert set(raw["env"]) <= {"PATH", "LANG", "HOME", "PWD"}  # bwrap's --chdir sets PWD.
    assert raw["uid"] == 65534  # nobody, in a user namespace of its own.


def test_verifier_that_prints_megabytes_still_gives_its_result(databases, verify):
    code = verifier(
        """
for _ in range(200):
    print('x' * 50_000)
print('{"status": "success", "raw_result": {"result": "complete"}}')
return {'result': 'others', 'printed': True}
"""
    )
    result = verify(code, *databases)
    assert result == {
        "result": "others",
        "execution_status": "success",
        "raw_result": {"result": "others", "printed": True},
    }


def test_verifier_that_raises_is_an_error_not_a_crash(databases, verify):
    result = verify(verifier("raise RuntimeError('broken verifier')"), *databases)
    blocked(result, "Execution error: RuntimeError: broken verifier")


def test_verifier_that_sleeps_forever_times_out(databases, verify):
    from echo_jax.awm.verifier import VerifierLimits

    code = verifier(f"{OS}['__builtins__']['__import__']('time').sleep(3600)\nreturn {{}}")
    started = time.monotonic()
    result = verify(code, *databases, limits=VerifierLimits(timeout_s=1))
    assert result["execution_status"] == "timeout"
    assert time.monotonic() - started < 5


# --- world servers ----------------------------------------------------------------------------

ENV_SERVER = """
import os
import uvicorn
from fastapi import FastAPI
from fastapi_mcp import FastApiMCP
from sqlalchemy import create_engine

engine = create_engine(os.environ["DATABASE_PATH"])
app = FastAPI()


@app.get("/env", operation_id="env")
def env():
    with open("/proc/self/environ", "rb") as f:
        raw = f.read().decode(errors="replace")
    return {"environ": dict(os.environ), "proc": raw}


FastApiMCP(app).mount_http()

if __name__ == "__main__":
    uvicorn.run(app, host="0.0.0.0", port=1)
"""


def test_world_server_sees_no_secrets_and_listens_on_loopback(world, monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    spy = dataclasses.replace(world, full_code=ENV_SERVER)
    with WorldServer(spy) as server:
        assert server.base_url.startswith("http://127.0.0.1:")
        seen = requests.get(f"{server.base_url}/env", timeout=10).json()
        listening = Path("/proc/net/tcp").read_text()
    assert "SECRET_TOKEN" not in seen["environ"] and "hunter2" not in seen["proc"]
    assert seen["environ"]["HOST"] == "127.0.0.1"
    port = int(server_port := seen["environ"]["PORT"])
    # /proc/net/tcp: local address 0100007F:PORT (127.0.0.1), never 00000000:PORT (0.0.0.0).
    assert f"0100007F:{port:04X}" in listening and f"00000000:{port:04X}" not in listening
    assert server_port


PARENT = """
import sys, time
sys.path.insert(0, {root!r})
from echo_jax.awm.world_format import load_worlds
from echo_jax.awm.world_server import WorldServer
server = WorldServer(load_worlds({fixture!r})["tiny_shop"]).start()
print(server.pid, flush=True)
time.sleep(600)
"""


def _stat(pid) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"  # A zombie has exited; it awaits reaping only.


def _group_alive(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group `pgid`."""
    members = []
    for entry in os.listdir("/proc"):
        stat = _stat(entry) if entry.isdigit() else None
        if stat is not None and stat[0] != "Z" and int(stat[2]) == pgid:
            members.append(int(entry))
    return members


def test_no_world_server_outlives_a_killed_parent(tmp_path):
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT.format(root=str(ROOT), fixture=str(FIXTURE))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        server_pid = int(parent.stdout.readline())
        assert _alive(server_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(server_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(server_pid)
        # Nothing left in its process group either (bwrap's PID 1 and the server inside the
        # sandbox go with it, killed by the kernel a moment later).
        while _group_alive(server_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _group_alive(server_pid) == []
    finally:
        if parent.poll() is None:
            parent.kill()


# --- paths ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../etc", "a/b", "..", "x\x00y", "C:\\evil"])
def test_scenario_names_cannot_leave_their_folder(name, world, tmp_path):
    from echo_jax.awm.capture_shards import shard_path
    from echo_jax.awm.world_format import WorldFormatError

    with pytest.raises(WorldFormatError, match="path traversal|not normalised"):
        load_worlds(FIXTURE, [name])  # How capture and replay pick worlds (and shard names).
    assert shard_path(tmp_path, "tiny_shop").parent == tmp_path / "episodes"
    server = WorldServer(
        dataclasses.replace(world, name=name, full_code="raise SystemExit(1)\n" + world.full_code)
    )
    with pytest.raises(Exception, match="exited with code 1"):
        server.start()  # A World built in code with a hostile name still stays in the temp dir.
    assert not list(Path("/etc").glob("awm_*"))
