"""A hostile world folder gets nothing (issue 25): its replies, files and processes, as an
attacker who controls a world's server code and verifiers would use them.

After each attack: this process is alive (the test returns), no process started for the world
or the verifier remains, the canary file and folder outside the run's folders are unchanged,
and the next honest request gives its normal result."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from echo_jax.awm.capped_tmpfs import owned_mounts
from echo_jax.awm.mcp_client import McpClient, WorldUnavailable
from echo_jax.awm.warm_verifier import VerifierPool
from echo_jax.awm.world_format import WorldFormatError, load_worlds
from tests.awm.hostile import (
    MARKER,
    ScriptedServer,
    descendants,
    marked_processes,
    settle,
    snapshot,
)

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "tiny_world"
HONEST_VERIFIER = (
    "def verify_task_completion(initial_db_path, final_db_path, final_answer=None):\n"
    "    return {'result': 'complete'}\n"
)


@pytest.fixture(scope="module")
def canary(tmp_path_factory):
    folder = tmp_path_factory.mktemp("canary")
    (folder / "secret.txt").write_text("the host's own file\n")
    (folder / "sub").mkdir()
    (folder / "sub" / "notes.db").write_bytes(b"not for the world")
    return folder


@pytest.fixture
def guard(canary):
    """The checks after every attack."""
    before_files, before_children = snapshot(canary), descendants()
    before_mounts = set(owned_mounts(os.getpid()))
    yield canary
    assert snapshot(canary) == before_files
    assert set(owned_mounts(os.getpid())) <= before_mounts  # Every tmpfs mounted for it is gone.
    assert settle(lambda: not marked_processes()), marked_processes()
    assert settle(lambda: descendants() <= before_children), descendants() - before_children


# --- replies that would crash or hang the parent --------------------------------------------


def _reply(connection, body: bytes, content_type="application/json", extra=b"") -> None:
    head = (
        f"HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n"
    ).encode()
    connection.sendall(head + extra + b"\r\n" + body)


def _result(request: bytes, result) -> bytes:
    return json.dumps(
        {"jsonrpc": "2.0", "id": json.loads(request)["id"], "result": result}
    ).encode()


def honest(request, connection):
    method = json.loads(request)["method"]
    if method == "tools/list":
        _reply(connection, _result(request, {"tools": [{"name": "get_item"}]}))
    elif method == "tools/call":
        _reply(connection, _result(request, {"content": [{"type": "text", "text": "ok"}]}))
    else:
        _reply(connection, _result(request, {"protocolVersion": "2025-06-18"}))


def trickle_headers(request, connection):
    connection.sendall(b"HTTP/1.1 200 OK\r\n")
    while True:
        connection.sendall(b"x")
        time.sleep(0.05)


def trickle_body(request, connection):
    connection.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n")
    while True:
        connection.sendall(b" ")
        time.sleep(0.05)


def huge_announced(request, connection):
    connection.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000000000\r\n\r\n")
    connection.sendall(b" " * (1 << 16))


def huge_chunked(request, connection):
    connection.sendall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (1 << 16, b" " * (1 << 16))
    for _ in range(64):  # 4 MiB, past the test client's cap
        connection.sendall(chunk)


def cut_chunked(request, connection):
    connection.sendall(
        b'HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n10\r\n{"jsonrpc": "2.'
    )
    connection.shutdown(2)


def nesting_bomb(request, connection):
    _reply(connection, b"[" * 200_000 + b"]" * 200_000)


def not_json(request, connection):
    _reply(connection, b"\xff\xfe not json")


def result_is_a_list(request, connection):
    _reply(connection, _result(request, [1, 2]))


def content_is_a_string(request, connection):
    _reply(connection, _result(request, {"content": "x", "tools": "x"}))


def text_is_a_number(request, connection):
    _reply(connection, _result(request, {"content": [{"type": "text", "text": 7}], "tools": [7]}))


def error_is_a_string(request, connection):
    _reply(
        connection,
        json.dumps({"jsonrpc": "2.0", "id": json.loads(request)["id"], "error": "x"}).encode(),
    )


def endless_cursor(request, connection):
    cursor = json.loads(request)["params"].get("cursor", 0) + 1
    _reply(connection, _result(request, {"tools": [], "nextCursor": cursor}))


@pytest.fixture(scope="module")
def scripted():
    server = ScriptedServer()
    yield server
    server.close()


ATTACKS = [trickle_headers, trickle_body, huge_announced, huge_chunked, cut_chunked,
           nesting_bomb, not_json, result_is_a_list, content_is_a_string, text_is_a_number,
           error_is_a_string, endless_cursor]  # fmt: skip


REASONS = {
    "trickle_headers": "no whole reply within",
    "trickle_body": "no whole reply within",
    "huge_announced": "over the cap",
    "huge_chunked": "over the cap",
    "cut_chunked": "broken reply",
    "nesting_bomb": "RecursionError",
    "not_json": "unparsable body",
    "result_is_a_list": "result is no JSON object",
    "content_is_a_string": "malformed",
    "text_is_a_number": "malformed tools|no string",
    "error_is_a_string": "malformed error",
    "endless_cursor": "still paginating",
}


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.__name__ for a in ATTACKS])
@pytest.mark.parametrize("method", ["tools/list", "tools/call"])
def test_a_hostile_reply_is_world_unavailable_within_its_deadline(scripted, guard, attack, method):
    if attack is endless_cursor and method == "tools/call":
        pytest.skip("pagination is tools/list's only")
    scripted.script = attack
    client = McpClient(scripted.url, timeout_s=0.5, retries=1, backoff_s=0.01,
                       max_reply_bytes=1 << 20)  # fmt: skip
    started = time.monotonic()
    with pytest.raises(WorldUnavailable, match=REASONS[attack.__name__]):
        if method == "tools/list":
            client.list_tools()
        else:
            client.call_tool("get_item", {"item_id": 1})
    assert time.monotonic() - started < 3.0
    scripted.script = honest
    assert client.call_tool("get_item", {"item_id": 1}).text == "ok"
    client.close()


def test_a_forged_answer_frame_is_a_cold_rerun_not_an_exception(guard, tmp_path, monkeypatch):
    from echo_jax.awm import warm_verifier
    from echo_jax.awm.world_server import build_database

    world = load_worlds(TINY)["tiny_shop"]
    db = tmp_path / "w.db"
    build_database(world, db)
    pool = VerifierPool()
    try:
        assert pool.run("tiny_shop", HONEST_VERIFIER, db, db)["result"] == "complete"
        worker = pool._slots["tiny_shop"].worker
        real_judge = warm_verifier.WarmWorker._judge

        def forged(self, answer, body, limits):  # What a child could put on the answer pipe.
            answer = {"id": answer["id"], "status": "done", "size": float("inf"), "exit": [],
                      "stderr": {}}  # fmt: skip
            return real_judge(self, answer, body, limits)

        monkeypatch.setattr(warm_verifier.WarmWorker, "_judge", forged)
        outcome = pool.run("tiny_shop", HONEST_VERIFIER, db, db)
        assert outcome["result"] == "complete"  # Rerun cold, with its real verdict.
        assert worker.failure is not None
        monkeypatch.setattr(warm_verifier.WarmWorker, "_judge", real_judge)
        assert pool.run("tiny_shop", HONEST_VERIFIER, db, db)["result"] == "complete"
    finally:
        pool.close()


# --- world files that would crash the loader ------------------------------------------------


def _copy_world(tmp_path):
    folder = tmp_path / "world"
    folder.mkdir()
    for file in TINY.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    return folder


def test_non_utf8_world_file_is_a_format_error_naming_it(guard, tmp_path):
    folder = _copy_world(tmp_path)
    (folder / "gen_tasks.jsonl").write_bytes(b'{"scenario": "tiny_shop", "tasks": ["\xff"]}\n')
    with pytest.raises(WorldFormatError, match=r"gen_tasks.jsonl:1: not UTF-8"):
        load_worlds(folder)
    assert set(load_worlds(TINY)) == {"tiny_shop", "tiny_shop_two"}


def test_huge_single_line_world_file_is_a_format_error_naming_it(guard, tmp_path, monkeypatch):
    from echo_jax.awm import world_format

    monkeypatch.setattr(world_format, "MAX_RECORD_BYTES", 1 << 20)  # The cap, made small.
    folder = _copy_world(tmp_path)
    (folder / "gen_spec.jsonl").write_bytes(b'{"x": "' + b"a" * (4 << 20))  # no newline
    with pytest.raises(WorldFormatError, match=r"gen_spec.jsonl:1: line is over"):
        load_worlds(folder)


# --- the host follows what the sandbox left -------------------------------------------------

SWAPPER = """
import os, threading, time
def _swap():
    here = os.path.dirname(os.environ["DATABASE_PATH"].removeprefix("sqlite:///"))
    up = os.path.dirname(here)
    while True:
        for name, target in (("world.db", {secret!r}), ("world.db-journal", {notes!r})):
            try:
                os.symlink(target, os.path.join(here, name + ".x"))
                os.replace(os.path.join(here, name + ".x"), os.path.join(here, name))
            except OSError:
                pass
        for name in ("server.log", "server.sock", "initial.db"):
            for folder in (up, here):
                try:
                    os.unlink(os.path.join(folder, name))
                except OSError:
                    pass
                try:
                    os.mkfifo(os.path.join(folder, name))
                except OSError:
                    pass
        time.sleep(0.002)
threading.Thread(target=_swap, daemon=True).start()
"""


def _within(seconds, function):
    """`function()`'s outcome (value or exception), or a failure if it blocks past `seconds`."""
    outcome = []

    def run():
        try:
            outcome.append(function())
        except Exception as error:  # noqa: BLE001 -- handed to the test
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"{function} blocked for {seconds}s"
    return outcome[0]


def test_links_and_fifos_a_server_leaves_are_never_followed_by_the_host(guard, tmp_path):
    import dataclasses
    import sqlite3

    from echo_jax.awm.world_server import ServerLimits, WorldServer, WorldServerError

    notes = guard / "sub" / "notes.db"
    with sqlite3.connect(tmp_path / "host.db") as connection:  # A host database to steal.
        connection.execute("CREATE TABLE secret (x)")
        connection.execute("INSERT INTO secret VALUES ('host secret')")
    stolen = tmp_path / "host.db"
    world = load_worlds(TINY)["tiny_shop"]
    swapper = SWAPPER.format(secret=str(stolen), notes=str(notes))
    hostile = dataclasses.replace(world, full_code=swapper + world.full_code)
    limits = ServerLimits(agent_timeout_s=2.0)
    before = stolen.read_bytes()
    with WorldServer(hostile, limits) as server:
        client = McpClient(server.mcp_url, timeout_s=5)
        client.initialize()
        time.sleep(0.2)  # The swapper has had its turns.
        for action in (server.reset, server.snapshot, server.stderr_tail, server.reset):
            outcome = _within(10, action)
            assert not isinstance(outcome, Exception) or isinstance(outcome, WorldServerError)
            if isinstance(outcome, Path):
                assert b"host secret" not in outcome.read_bytes()
        assert client.list_tools()  # The bridge still reaches the server's own socket.
        client.close()
    assert stolen.read_bytes() == before
    with WorldServer(world) as server, McpClient(server.mcp_url, timeout_s=5) as client:
        client.initialize()
        assert not client.call_tool("create_order", {"item_id": 1, "quantity": 2}).is_error
        server.reset()
        with sqlite3.connect(server.snapshot()) as connection:
            assert connection.execute("SELECT COUNT(*) FROM orders").fetchone() == (0,)


# --- processes that would outlive their sandbox, resources without a cap --------------------

SYSCALL_ATTACK = r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
def tried(name, call):
    result = call()
    print(name, result, ctypes.get_errno() if result == -1 else 0, flush=True)
tried('ptrace', lambda: libc.ptrace(16, 1, 0, 0))  # PTRACE_ATTACH to the sandbox's PID 1
tried('process_vm_readv', lambda: libc.process_vm_readv(1, 0, 0, 0, 0, 0))
tried('shmget', lambda: libc.shmget(0, 4096, 0o1000 | 0o600))
tried('keyctl', lambda: libc.syscall(250, 0, -3, 0, 0))  # the session keyring
tried('unshare', lambda: libc.unshare(0x10000000))
try:
    open('/proc/1/mem', 'r+b')
    print('pid 1 mem opened', flush=True)
except OSError as error:
    print('pid 1 mem', type(error).__name__, flush=True)
raise SystemExit('attack done')
"""


def test_ptrace_shared_memory_keyrings_and_namespaces_are_refused_inside(guard):
    import dataclasses

    from echo_jax.awm.world_server import WorldServer, WorldServerError

    world = load_worlds(TINY)["tiny_shop"]
    hostile = dataclasses.replace(world, full_code=SYSCALL_ATTACK + world.full_code)
    with pytest.raises(WorldServerError, match="attack done") as raised:
        WorldServer(hostile).start()
    lines = dict(line.split(" ", 1) for line in str(raised.value).splitlines() if " -1 " in line)
    eperm = "-1 1"
    assert lines == dict.fromkeys(
        ["ptrace", "process_vm_readv", "shmget", "keyctl", "unshare"], eperm
    )
    assert "pid 1 mem PermissionError" in str(raised.value)  # `sandbox.PID_1_MASK`


def _hostile_verifier(body: str) -> str:
    from tests.awm.test_wall import verifier

    return verifier(body)


def _found(result: dict) -> dict:
    assert result["execution_status"] == "success", result
    return result["raw_result"]["found"]


@pytest.fixture(scope="module")
def dbs(tmp_path_factory):
    from echo_jax.awm.world_server import build_database

    folder = tmp_path_factory.mktemp("dbs")
    world = load_worlds(TINY)["tiny_shop"]
    build_database(world, folder / "initial.db")
    build_database(world, folder / "final.db")
    return folder / "initial.db", folder / "final.db"


REACH_THE_WORKER = """
P = os['getppid']()
probe('mem', lambda: B['open'](f'/proc/{P}/mem', 'r+b') and 'opened')
probe('stdin', lambda: B['open'](f'/proc/{P}/fd/0', 'wb') and 'opened')
"""

# A thread of its own behind a zombie leader: its grandchild's main thread exits alone.
THREAD_BEHIND_A_ZOMBIE = f"""
C = B['__import__']('ctypes')
T = B['__import__']('_thread')
Time = B['__import__']('time')
if os['fork']() == 0:
    def linger():
        B['open']('/proc/thread-self/comm', 'w').write('{MARKER}')
        Time.sleep(3600)
    T.start_new_thread(linger, ())
    Time.sleep(0.2)
    C.CDLL(None).syscall(60, 0)  # exit(2): this thread only
Time.sleep(0.5)
"""

LOCKED_FOLDER = """
os['makedirs']('/tmp/locked/inner')
B['open']('/tmp/locked/inner/left', 'w').write('x')
os['chmod']('/tmp/locked', 0)
probe('made', lambda: 'yes')
"""


def test_a_warm_verification_cannot_reach_its_worker_or_outlive_itself(guard, warm_worker, dbs):
    from echo_jax.awm.verifier import VerifierLimits

    limits = VerifierLimits()
    reached = _found(warm_worker.verify(_hostile_verifier(REACH_THE_WORKER), *dbs, None, limits))
    assert reached == {"mem": "failed: PermissionError", "stdin": "failed: PermissionError"}
    warm_worker.verify(_hostile_verifier(THREAD_BEHIND_A_ZOMBIE), *dbs, None, limits)
    assert not marked_processes()  # Killed before the answer came.
    warm_worker.verify(_hostile_verifier(LOCKED_FOLDER), *dbs, None, limits)
    listing = _found(
        warm_worker.verify(
            _hostile_verifier("probe('tmp', lambda: os['listdir']('/tmp'))"), *dbs, None, limits
        )
    )
    assert listing == {"tmp": []}
    assert warm_worker.verify(HONEST_VERIFIER, *dbs, None, limits)["result"] == "complete"


PROCESS_FLOOD = f"""
Time = B['__import__']('time')
started = 0
for _ in range(48):
    try:
        if os['fork']() == 0:
            B['open']('/proc/self/comm', 'w').write('{MARKER}')
            Time.sleep(30)
            os['_exit'](0)
        started += 1
    except OSError:
        break
probe('started', lambda: started)
"""

MEMORY_FLOOD = """
held = B['bytearray'](160 << 20)
for i in B['range'](0, len(held), 4096):
    held[i] = 1
probe('held', lambda: len(held))
"""


def test_a_verifiers_processes_and_memory_are_capped_as_a_whole(guard, dbs):
    from echo_jax.awm.verifier import VerifierLimits, run_verifier

    limits = VerifierLimits(max_processes=16, memory_bytes=64 << 20)
    flood = _found(run_verifier(_hostile_verifier(PROCESS_FLOOD), *dbs, None, limits))
    assert flood["started"] < 16
    swollen = run_verifier(_hostile_verifier(MEMORY_FLOOD), *dbs, None, limits)
    assert swollen["execution_status"] == "error", swollen
    assert run_verifier(HONEST_VERIFIER, *dbs, None, limits)["result"] == "complete"


DISK_FLOOD = r"""
import os
here = os.path.dirname(os.environ["DATABASE_PATH"].removeprefix("sqlite:///"))
written = 0
try:
    for i in range(32):
        with open(os.path.join(here, f"flood{i}"), "wb") as out:
            out.write(b"x" * (1 << 20))
        written += 1 << 20
except OSError as error:
    print("stopped:", type(error).__name__, flush=True)
print("written", written, flush=True)
raise SystemExit('attack done')
"""


def test_a_server_fills_only_its_own_capped_folder(guard):
    import dataclasses

    from echo_jax.awm.world_server import ServerLimits, WorldServer, WorldServerError

    world = load_worlds(TINY)["tiny_shop"]
    hostile = dataclasses.replace(world, full_code=DISK_FLOOD + world.full_code)
    with pytest.raises(WorldServerError, match="attack done") as raised:
        WorldServer(hostile, ServerLimits(folder_bytes=8 << 20)).start()
    written = [line for line in str(raised.value).splitlines() if line.startswith("written")]
    assert written and int(written[0].split()[1]) <= 8 << 20


INODE_FLOOD = """
made, why = 0, 'none'
for i in B['range'](20000):
    try:
        B['open'](f'/tmp/f{i}', 'w').close()
        made += 1
    except OSError as error:
        why = B['__import__']('errno').errorcode[error.errno]
        break
probe('made', lambda: made)
probe('why', lambda: why)
probe('dev', lambda: B['open']('/dev/f', 'w') and 'opened')
"""


def test_an_inode_flood_stops_at_the_tmpfs_cap(verify, guard, dbs):
    """Empty files cost no bytes: only nr_inodes (`capped_tmpfs`) stops them."""
    from echo_jax.awm import sandbox

    started = time.monotonic()
    flood = _found(verify(_hostile_verifier(INODE_FLOOD), *dbs))
    assert flood["why"] == "ENOSPC" and flood["made"] < sandbox.VERIFIER_TMP_INODES, flood
    assert flood["dev"] == "failed: OSError"  # /dev is read-only: no second tmpfs to fill.
    assert verify(HONEST_VERIFIER, *dbs)["result"] == "complete"
    assert time.monotonic() - started < 10


def test_where_mounting_is_refused_a_tmpfs_is_capped_in_size_only_and_says_so(
    guard, dbs, monkeypatch, caplog
):
    """Without root the host cannot mount: bwrap's own tmpfs (bytes capped), and a warning."""
    from echo_jax.awm import capped_tmpfs
    from echo_jax.awm.verifier import run_verifier

    class Refusing:
        @staticmethod
        def mount(*args):
            return -1

    monkeypatch.setattr(capped_tmpfs, "_libc", Refusing)
    monkeypatch.setattr(capped_tmpfs, "_warned", [])
    assert run_verifier(HONEST_VERIFIER, *dbs)["result"] == "complete"
    assert "gets a tmpfs capped in size only, not in inodes" in caplog.text


SERVER_INODE_FLOOD = r"""
import os
here = os.path.dirname(os.environ["DATABASE_PATH"].removeprefix("sqlite:///"))
for folder in (here, "/tmp", "/dev"):
    made, why = 0, "none"
    for i in range(20000):
        try:
            open(os.path.join(folder, f"f{i}"), "w").close()
            made += 1
        except OSError as error:
            why = type(error).__name__
            break
    print("made", folder == here and "folder" or folder, made, why, flush=True)
raise SystemExit('attack done')
"""


def test_a_server_inode_flood_stops_at_its_caps(guard, monkeypatch):
    import dataclasses

    from echo_jax.awm import sandbox
    from echo_jax.awm.world_server import ServerLimits, WorldServer, WorldServerError

    monkeypatch.setattr(sandbox, "SERVER_TMP_INODES", 1000)
    world = load_worlds(TINY)["tiny_shop"]
    hostile = dataclasses.replace(world, full_code=SERVER_INODE_FLOOD + world.full_code)
    started = time.monotonic()
    with pytest.raises(WorldServerError, match="attack done") as raised:
        WorldServer(hostile, ServerLimits(folder_inodes=1000)).start()
    made = {
        line.split()[1]: (int(line.split()[2]), line.split()[3])
        for line in str(raised.value).splitlines()
        if line.startswith("made ")
    }
    assert made["folder"][0] < 1000 and made["folder"][1] == "OSError", made
    assert made["/tmp"][0] < 1000 and made["/tmp"][1] == "OSError", made
    assert made["/dev"][0] == 0, made
    with WorldServer(world) as server, McpClient(server.mcp_url, timeout_s=5) as client:
        client.initialize()
        assert not client.call_tool("create_order", {"item_id": 1, "quantity": 2}).is_error
    assert time.monotonic() - started < 20


# A verifier that takes over bwrap's PID 1 through /proc/1/mem: its code after the wait4 that
# waits for the verifier becomes prctl(PR_SET_PDEATHSIG, 0); setsid(); for (;;) pause(); so PID 1
# outlives the verifier, leaves the host's process group and survives its parent, and with it
# the sandbox and a child that left the group too (x86-64 machine code).
PID_1_TAKEOVER = f"""
Time = B['__import__']('time')
if os['fork']() == 0:
    os['setsid']()
    B['open']('/proc/self/comm', 'w').write('{MARKER}')
    Time.sleep(3600)
    os['_exit'](0)
pc = B['int'](B['open']('/proc/1/syscall').read().split()[-1], 16)
code = B['bytes'].fromhex('bf01000000 31f6 b89d000000 0f05 b870000000 0f05 b822000000 0f05 ebf7')
mem = B['open']('/proc/1/mem', 'r+b', buffering=0)
mem.seek(pc)
probe('wrote', lambda: mem.write(code))
"""

x86_64_only = pytest.mark.skipif(
    __import__("platform").machine() != "x86_64", reason="the takeover is x86-64 machine code"
)


@x86_64_only
def test_the_cgroup_kill_ends_a_sandbox_that_outlives_its_pid_1_teardown(guard, dbs, monkeypatch):
    """Without a PID 1 of its own, nothing in a sandbox outlives bwrap's PID 1 (the kernel kills
    a PID namespace with it). With PID 1 taken over (its /proc/1/mem mask removed here, as
    another way in would), only the cgroup's kill ends the sandbox."""
    from echo_jax.awm import sandbox
    from echo_jax.awm.cgroup import SandboxCgroup
    from echo_jax.awm.verifier import VerifierLimits, run_verifier

    probe = SandboxCgroup.create("a test", 16, 64 << 20)
    if probe is None:
        pytest.skip("no cgroup here (not root)")
    probe.kill()
    monkeypatch.setattr(sandbox, "PID_1_MASK", ())
    started = time.monotonic()
    outcome = run_verifier(_hostile_verifier(PID_1_TAKEOVER), *dbs, None,
                           VerifierLimits(timeout_s=1.0))  # fmt: skip
    assert outcome["execution_status"] == "timeout", (
        outcome
    )  # PID 1 never reported the verifier's end.
    assert not marked_processes()  # Gone when run_verifier returned: the cgroup was killed.
    assert run_verifier(HONEST_VERIFIER, *dbs)["result"] == "complete"
    assert time.monotonic() - started < 10


REACH_PID_1 = """
probe('mem', lambda: B['open']('/proc/1/mem', 'r+b') and 'opened')
probe('task', lambda: B['open']('/proc/1/task/1/mem', 'r+b') and 'opened')
probe('read', lambda: B['open']('/proc/1/mem', 'rb').read(16).hex())
"""


def test_bwraps_pid_1_memory_cannot_be_opened_for_writing(verify, guard, dbs):
    """/proc/1/mem of bwrap's PID 1 is /dev/null bound read-only and without devices
    (`sandbox.PID_1_MASK`): it opens neither for writing nor for reading."""
    reached = _found(verify(_hostile_verifier(REACH_PID_1), *dbs))
    assert reached == {"mem": "failed: PermissionError", "task": "failed: PermissionError",
                       "read": "failed: PermissionError"}  # fmt: skip
    assert verify(HONEST_VERIFIER, *dbs)["result"] == "complete"
