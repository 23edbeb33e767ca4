"""Run one AWM world as a real FastAPI + MCP server process on the loopback interface.

The world's generated `full_code` is untrusted-ish model output, so it runs under bubblewrap
(`echo_jax.awm.sandbox`: its own namespaces, no network, only its folder writable; it serves on
a Unix socket that `_LoopbackBridge` forwards to 127.0.0.1:PORT), in its own process group, from
a private temp dir, with a clean environment, resource limits and a parent-death signal;
`stop()` (also called at exit) kills the whole group. The database is built once from the world's
DDL and sample inserts; a pristine copy is kept so `reset()` can restore the initial state
between episodes without paying for a server restart.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import functools
import os
import re
import resource
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import requests

from echo_jax.awm import sandbox
from echo_jax.awm.launcher import prepare_server_code
from echo_jax.awm.world_format import World

LOOPBACK = "127.0.0.1"
_ESSENTIAL_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")
_PR_SET_PDEATHSIG = 1
_STOP_GRACE_S = 3.0
_REAP_WAIT_S = 2.0

# Runs server.py as __main__ after pinning uvicorn.run to 127.0.0.1 and $PORT, so a generated
# server that hard-codes another host or port still only listens on the loopback interface.
_LOOPBACK_LAUNCHER = """
import os, runpy, sys
import uvicorn
_run = uvicorn.run
def _loopback_run(app, *args, **kwargs):
    kwargs.update(host="127.0.0.1", port=int(os.environ["PORT"]), access_log=False)
    return _run(app, **kwargs)
uvicorn.run = _loopback_run
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


# Under the sandbox the server has a network namespace of its own (no network): this runs before
# the launcher and turns its uvicorn.run into one on a Unix socket in the server's folder, which
# the parent bridges to 127.0.0.1:$PORT (`_LoopbackBridge`).
_UNIX_SOCKET_PRELUDE = """
import os
import uvicorn
_unix_run = uvicorn.run
def _unix_socket_run(app, *args, **kwargs):
    kwargs.pop("host", None)
    kwargs.pop("port", None)
    kwargs["uds"] = os.environ["ECHO_JAX_SERVER_SOCKET"]
    return _unix_run(app, **kwargs)
uvicorn.run = _unix_socket_run
"""
_SOCKET_NAME = "server.sock"


def _pump_both_ways(client: socket.socket, upstream: socket.socket) -> None:
    """Copy bytes both ways until both sides have finished sending; then close both."""
    with client, upstream:
        peers = {client: upstream, upstream: client}
        while peers:
            readable, _, _ = select.select(list(peers), [], [])
            for sender in readable:
                try:
                    data = sender.recv(1 << 16)
                except OSError:
                    data = b""
                receiver = peers[sender]
                if data:
                    try:
                        receiver.sendall(data)
                    except OSError:
                        return
                else:
                    del peers[sender]
                    with contextlib.suppress(OSError):
                        receiver.shutdown(socket.SHUT_WR)


class _LoopbackBridge:
    """Listens on 127.0.0.1:PORT in the parent and forwards each connection to a Unix socket."""

    def __init__(self, socket_path: Path):
        self._socket_path = str(socket_path)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind((LOOPBACK, 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._serve, name=f"bridge:{self.port}", daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # Closed: the server stopped.
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.connect(self._socket_path)
        except OSError:  # Not listening (yet, or any more): the client sees the connection close.
            upstream.close()
            client.close()
            return
        _pump_both_ways(client, upstream)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()


class WorldServerError(RuntimeError):
    """The world's database could not be built or its server did not come up."""


@dataclass(frozen=True)
class ServerLimits:
    """Resource limits for a world server; generous enough for uvicorn and its thread pool."""

    address_space_bytes: int = 4 << 30
    cpu_seconds: int = 3600
    file_size_bytes: int = 1 << 30
    startup_timeout_s: float = 30.0
    start_attempts: int = 3


def build_database(world: World, path: str | Path) -> None:
    """Create the world's SQLite database at `path`: tables, then indexes, then sample rows."""
    tables = world.db_schema["tables"]
    statements = [table["ddl"] for table in tables]
    statements += [index for table in tables for index in table["indexes"]]
    statements += [
        insert for table in world.sample_data["tables"] for insert in table["insert_statements"]
    ]
    body = "\n".join(s if s.rstrip().endswith(";") else f"{s};" for s in map(str.strip, statements))
    try:
        with contextlib.closing(sqlite3.connect(path)) as connection:
            connection.executescript(f"PRAGMA synchronous=OFF;\nBEGIN;\n{body}\nCOMMIT;")
    except sqlite3.Error as error:
        raise WorldServerError(f"{world.name}: building the database failed: {error}") from error


def copy_database(source: str | Path, target: str | Path) -> None:
    """Copy a SQLite database through the backup API.

    Unlike a file copy this goes through SQLite's locking and bumps the change counter, so the
    server's pooled SQLAlchemy connections see the new content on their next transaction, and a
    WAL-mode source is copied with its not-yet-checkpointed pages. The copies are scratch files
    in a temp dir, so the write skips fsync (15 ms -> 1 ms per copy).
    """
    with (
        contextlib.closing(sqlite3.connect(source)) as src,
        contextlib.closing(sqlite3.connect(target, timeout=10.0)) as dst,
    ):
        dst.execute("PRAGMA synchronous=OFF")
        src.backup(dst)


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """libc for prctl on Linux; looked up once, as find_library runs a subprocess."""
    name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    return None if name is None else ctypes.CDLL(name, use_errno=True)


def parent_death_hook() -> Callable[[], None]:
    """Return a preexec hook asking Linux to SIGKILL the child when its parent thread dies."""
    libc = _libc()
    if libc is None:
        return lambda: None
    return lambda: libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _limiting_preexec(limits: ServerLimits) -> Callable[[], None]:
    set_death_signal = parent_death_hook()

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limits.address_space_bytes,) * 2)
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds,) * 2)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_size_bytes,) * 2)
        set_death_signal()

    return apply


def kill_process_group(process: subprocess.Popen, grace_s: float = _STOP_GRACE_S) -> None:
    """SIGTERM the process group led by `process`, SIGKILL it after `grace_s`, and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace_s)
    # Also catches anything the leader spawned that outlived it in the same group (inside the
    # sandbox: bwrap's PID 1 and the server), then waits, briefly, until their parents (not us)
    # have reaped them, so that a stopped server has no process left.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + _REAP_WAIT_S
    with contextlib.suppress(ProcessLookupError):
        while time.monotonic() < deadline:
            os.killpg(process.pid, 0)
            time.sleep(0.005)


class WorldServer:
    """A running world: its server process, live database and pristine initial database.

    Use as a context manager, or call start()/stop(). Not thread-safe; one episode at a time.
    The parent-death signal is tied to the thread that starts the server: start it from a thread
    that lives as long as the server (the capture workers use their main thread).
    """

    def __init__(self, world: World, limits: ServerLimits | None = None):
        self.world = world
        self.limits = limits or ServerLimits()
        self._dir: Path | None = None
        self._process: subprocess.Popen | None = None
        self._port: int | None = None
        self._bridge: _LoopbackBridge | None = None

    @property
    def base_url(self) -> str:
        if self._port is None:
            raise WorldServerError(f"{self.world.name}: server is not started")
        return f"http://{LOOPBACK}:{self._port}"

    @property
    def mcp_url(self) -> str:
        return f"{self.base_url}/mcp"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def db_path(self) -> Path:
        return self._require_dir() / "world.db"

    @property
    def initial_db_path(self) -> Path:
        return self._require_dir() / "initial.db"

    @property
    def _log_path(self) -> Path:
        return self._require_dir() / "server.log"

    def _require_dir(self) -> Path:
        if self._dir is None:
            raise WorldServerError(f"{self.world.name}: server is not started")
        return self._dir

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> WorldServer:
        """Build the databases, launch the server and wait until /mcp answers."""
        if self._process is not None:
            raise WorldServerError(f"{self.world.name}: server already started")
        # The name only decorates the folder, and only when it cannot leave the temp dir.
        safe = self.world.name if re.fullmatch(r"[a-z0-9_]{1,64}", self.world.name) else "world"
        self._dir = Path(tempfile.mkdtemp(prefix=f"awm_{safe}_"))
        atexit.register(self.stop)
        try:
            build_database(self.world, self.initial_db_path)
            copy_database(self.initial_db_path, self.db_path)
            server_path = self._dir / "server.py"
            code = prepare_server_code(
                self.world.full_code,
                scenario=self.world.name,
                database_url=f"sqlite:///{self.db_path}",
            )
            server_path.write_text(code, encoding="utf-8")
            self._launch_with_port_retries(server_path)
        except BaseException:
            self.stop()
            raise
        return self

    def _launch_with_port_retries(self, server_path: Path) -> None:
        for attempt in range(1, self.limits.start_attempts + 1):
            self._port = _free_loopback_port()
            self._launch(server_path)
            try:
                self._wait_until_ready()
                return
            except WorldServerError:
                kill_process_group(self._process)
                self._process = None
                # Another process may have grabbed the port between probe and bind: retry.
                port_taken = "address already in use" in self.stderr_tail().lower()
                if not port_taken or attempt == self.limits.start_attempts:
                    raise

    def _launch(self, server_path: Path) -> None:
        home = self._require_dir()
        binary = sandbox.require_sandbox(f"world server {self.world.name!r}")
        self._close_bridge()
        if binary is not None:  # No network of its own: the parent bridges its port.
            self._bridge = _LoopbackBridge(home / _SOCKET_NAME)
            self._port = self._bridge.port
        env = {key: os.environ[key] for key in _ESSENTIAL_ENV if key in os.environ}
        env.update(
            HOME=str(home),
            TMPDIR=str(home),
            PYTHONUNBUFFERED="1",
            PYTHONDONTWRITEBYTECODE="1",
            DATABASE_PATH=f"sqlite:///{self.db_path}",
            HOST=LOOPBACK,
            PORT=str(self._port),
        )
        command = [sys.executable, "-c", _LOOPBACK_LAUNCHER, str(server_path)]
        if binary is not None:
            env["ECHO_JAX_SERVER_SOCKET"] = str(home / _SOCKET_NAME)
            command[2] = _UNIX_SOCKET_PRELUDE + _LOOPBACK_LAUNCHER
            command = sandbox.server_argv(binary, str(home), env, command)
            env = {"PATH": os.defpath}  # bwrap clears it and sets the server's own.
        with self._log_path.open("wb") as log:
            self._process = subprocess.Popen(
                command,
                cwd=home,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_limiting_preexec(self.limits),
            )

    def _wait_until_ready(self) -> None:
        """Poll GET /mcp: any answer but 404 means uvicorn is up and the MCP route is mounted."""
        deadline = time.monotonic() + self.limits.startup_timeout_s
        last_problem = "no answer yet"
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise WorldServerError(
                    f"{self.world.name}: server exited with code {self._process.returncode} "
                    f"during start-up; log tail:\n{self.stderr_tail()}"
                )
            try:
                response = requests.get(self.mcp_url, timeout=1.0)
            except requests.RequestException as error:
                last_problem = f"{type(error).__name__}"
            else:
                if response.status_code != 404:
                    return
                last_problem = "/mcp answered 404 (is FastApiMCP(app).mount_http() called?)"
            time.sleep(0.05)
        raise WorldServerError(
            f"{self.world.name}: server not ready after {self.limits.startup_timeout_s:.0f}s "
            f"({last_problem}); log tail:\n{self.stderr_tail()}"
        )

    def stderr_tail(self, max_chars: int = 4000) -> str:
        """The end of the server's combined stdout/stderr log, for error messages."""
        try:
            with self._log_path.open("rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - max_chars))
                return log.read().decode("utf-8", errors="replace")
        except (OSError, WorldServerError):
            return ""

    def reset(self) -> None:
        """Restore the initial database in place; call only while no request is running."""
        if not self.is_running():
            raise WorldServerError(f"{self.world.name}: cannot reset, server is not running")
        copy_database(self.initial_db_path, self.db_path)

    def _close_bridge(self) -> None:
        if self._bridge is not None:
            self._bridge.close()
            self._bridge = None

    def stop(self) -> None:
        """Kill the server's process group and delete the temp dir; safe to call twice."""
        atexit.unregister(self.stop)
        if self._process is not None:
            kill_process_group(self._process)
            self._process = None
        self._close_bridge()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self._port = None

    def __enter__(self) -> WorldServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
