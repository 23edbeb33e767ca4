"""Run one AWM world as a real FastAPI + MCP server process on the loopback interface.

The world's generated `full_code` is untrusted-ish model output, so it runs under bubblewrap
(`echo_jax.awm.sandbox`: its own namespaces, no network, only its folder writable; it serves on
a Unix socket that `echo_jax.awm.loopback` bridges to 127.0.0.1:PORT), in its own process group,
from a private temp dir, with a clean environment, resource limits and a parent-death signal
(`echo_jax.awm.child_process`); `stop()` (also called at exit) kills the whole group. The
database is built once from the world's DDL and sample inserts into the host's folder; the
live copy, in the server's own folder, is made, reset between episodes (without paying for a
server restart) and snapshotted for the verifier from inside the server's sandbox
(`echo_jax.awm.world_agent`), so the host never opens a path the server can replace.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from echo_jax.awm import sandbox, seccomp_filter
from echo_jax.awm.capped_tmpfs import CappedTmpfs
from echo_jax.awm.cgroup import SandboxCgroup
from echo_jax.awm.child_process import (
    ChildLimits,
    kill_process_group,
    limiting_preexec,
    read_tail,
)
from echo_jax.awm.launcher import prepare_server_code
from echo_jax.awm.loopback import (
    LOOPBACK,
    LOOPBACK_LAUNCHER,
    SOCKET_NAME,
    UNIX_SOCKET_PRELUDE,
    LoopbackBridge,
    free_loopback_port,
)
from echo_jax.awm.world_agent import AGENT_PRELUDE, AgentChannel, AgentError
from echo_jax.awm.world_format import World

_ESSENTIAL_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")


class WorldServerError(RuntimeError):
    """The world's database could not be built or its server did not come up."""


@dataclass(frozen=True)
class ServerLimits(ChildLimits):
    """Resource limits for a world server; generous enough for uvicorn and its thread pool."""

    address_space_bytes: int = 4 << 30
    cpu_seconds: int = 3600
    file_size_bytes: int = 1 << 30
    startup_timeout_s: float = 30.0
    start_attempts: int = 3
    agent_timeout_s: float = 30.0  # A reset or a snapshot of the live database.
    # The sandbox as a whole (`cgroup`): uvicorn's threads count as processes; the memory of
    # all of them, with the private /tmp's pages.
    max_processes: int = 512
    memory_bytes: int = 6 << 30
    folder_bytes: int = 1 << 30  # Its writable folder, a tmpfs (in memory: within memory_bytes).
    folder_inodes: int = 65536  # and its files and folders (`capped_tmpfs`; where root).


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
    in a temp dir, so the write skips fsync, which would otherwise take most of each copy's time
    (`benchmarks/rollout_throughput.py` reports tool time, the resets' copies included).
    """
    with (
        contextlib.closing(sqlite3.connect(source)) as src,
        contextlib.closing(sqlite3.connect(target, timeout=10.0)) as dst,
    ):
        dst.execute("PRAGMA synchronous=OFF")
        src.backup(dst)


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
        self._bridge: LoopbackBridge | None = None
        self._agent: AgentChannel | None = None
        self._group: SandboxCgroup | None = None
        self._mounts: list[CappedTmpfs] = []

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
    def folder(self) -> Path:
        """The one folder the server can write (its database, scratch, HOME). Under the sandbox
        it is a tmpfs mounted at this path while the server runs: by the host where it may mount
        (`capped_tmpfs`: then the host sees its files here too), else by bwrap in the sandbox
        only; the host opens nothing in it either way."""
        return self._require_dir() / "world"

    @property
    def db_path(self) -> Path:
        """The live database, in the server's folder; the host reads it only through
        `snapshot`."""
        return self.folder / "world.db"

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
            self.folder.mkdir(mode=0o700)
            build_database(self.world, self.initial_db_path)
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
            self._port = free_loopback_port()
            self._launch(server_path)
            try:
                self._wait_until_ready()
                return
            except WorldServerError:
                self._kill()
                # Another process may have grabbed the port between probe and bind: retry.
                port_taken = "address already in use" in self.stderr_tail().lower()
                if not port_taken or attempt == self.limits.start_attempts:
                    raise

    def _launch(self, server_path: Path) -> None:
        home = self.folder
        binary = sandbox.require_sandbox(f"world server {self.world.name!r}")
        self._close_bridge()
        listener = self._listen() if binary is not None else None
        if self._agent is not None:
            self._agent.close()
        self._agent = AgentChannel(self.limits.agent_timeout_s, self.limits.file_size_bytes)
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
        env.update(self._agent.child_env(self.initial_db_path, self.db_path))
        command = [sys.executable, "-c", AGENT_PRELUDE + LOOPBACK_LAUNCHER, str(server_path)]
        pass_fds = list(self._agent.child_fds)
        seccomp_fd = -1
        if listener is not None:
            seccomp_fd = seccomp_filter.bpf_fd()
            pass_fds.append(seccomp_fd)
            env["ECHO_JAX_SERVER_FD"] = str(listener.fileno())
            pass_fds.append(listener.fileno())
            command[2] = AGENT_PRELUDE + UNIX_SOCKET_PRELUDE + LOOPBACK_LAUNCHER
            what = f"world server {self.world.name!r}"
            tmp = CappedTmpfs.create(what, sandbox.SERVER_TMP_BYTES, sandbox.SERVER_TMP_INODES,
                                     parent=self._require_dir())  # fmt: skip
            folder_tmpfs = CappedTmpfs.create(what, self.limits.folder_bytes,
                                              self.limits.folder_inodes, at=home)  # fmt: skip
            self._mounts = [mount for mount in (tmp, folder_tmpfs) if mount is not None]
            # The host's folder read-only (initial database, server code), the server's own
            # writable inside it.
            command = sandbox.server_argv(
                binary,
                str(home),
                env,
                command,
                seccomp_fd,
                self.limits.folder_bytes,
                extra_ro=[str(self._require_dir())],
                tmp=tmp,
                folder_tmpfs=folder_tmpfs,
            )
            env = {"PATH": os.defpath}  # bwrap clears it and sets the server's own.
        self._group = SandboxCgroup.create(
            f"world server {self.world.name!r}", self.limits.max_processes, self.limits.memory_bytes
        )
        try:
            self._start_process(command, home, env, pass_fds)
        finally:
            if listener is not None:
                listener.close()
                os.close(seccomp_fd)
            self._agent.started()

    def _listen(self) -> socket.socket:
        """The server's listening socket, made by the host in its own folder (the server, with
        no network of its own, inherits it), and the bridge from 127.0.0.1:PORT to it."""
        socket_path = self._require_dir() / SOCKET_NAME
        socket_path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(socket_path))
        listener.listen(64)
        self._bridge = LoopbackBridge(socket_path)
        self._port = self._bridge.port
        return listener

    def _start_process(self, command, home, env, pass_fds) -> None:
        with self._log_path.open("wb") as log:
            self._process = subprocess.Popen(
                command,
                cwd=home,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=pass_fds,
                start_new_session=True,
                preexec_fn=limiting_preexec(self.limits, self._group),
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
            return read_tail(self._log_path, max_chars)
        except (OSError, WorldServerError):
            return ""

    def reset(self) -> None:
        """Restore the initial database in place; call only while no request is running."""
        if not self.is_running():
            raise WorldServerError(f"{self.world.name}: cannot reset, server is not running")
        try:
            self._agent.reset()
        except AgentError as error:
            raise WorldServerError(f"{self.world.name}: {error}") from None

    def snapshot(self, name: str = "final.db") -> Path:
        """A copy of the live database in the host's own folder (what a verifier sees)."""
        if not self.is_running():
            raise WorldServerError(f"{self.world.name}: cannot snapshot, server is not running")
        target = self._require_dir() / name
        target.unlink(missing_ok=True)
        try:
            self._agent.snapshot(target)
        except AgentError as error:
            target.unlink(missing_ok=True)
            raise WorldServerError(f"{self.world.name}: {error}") from None
        return target

    def _kill(self) -> None:
        """The server's process group, then whatever else is left in its cgroup."""
        if self._process is not None:
            kill_process_group(self._process)
            self._process = None
        if self._group is not None:
            self._group.kill()
            self._group = None
        for mount in self._mounts:  # Nothing of the sandbox is left to hold them.
            mount.close()
        self._mounts = []

    def _close_bridge(self) -> None:
        if self._bridge is not None:
            self._bridge.close()
            self._bridge = None

    def stop(self) -> None:
        """Kill the server's process group and delete the temp dir; safe to call twice."""
        atexit.unregister(self.stop)
        self._kill()
        self._close_bridge()
        if self._agent is not None:
            self._agent.close()
            self._agent = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self._port = None

    def __enter__(self) -> WorldServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
