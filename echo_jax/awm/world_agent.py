"""Reset and snapshot a world's live database from inside its own sandbox.

The live database sits in the one folder the world server can write, so the server can swap it
(or its journal) for a link to a host file or a FIFO at any moment. The host therefore never
opens a path there: a thread in the server's own process (`AGENT_PRELUDE`, run before the
server's code) does the resets and snapshots, where every path resolves inside the sandbox's
own view, and the host talks to it over a pipe pair. A snapshot comes back as bytes (capped),
which the host writes to a file of its own. The server's code can stop or fool this thread, but
then it only breaks or fakes its own world: a reset or a snapshot that does not come back
in time, or comes back malformed, is an `AgentError` (a world failure for the caller).

The agent also creates the live database (a copy of the initial one) before the server's code
runs: under the sandbox the server's folder is a tmpfs of its own, empty at start.

Protocol: the host writes one line, `reset` or `snapshot`; the agent answers one line, `ok`,
`error MESSAGE` or `bytes N`, followed by N bytes for a snapshot.
"""

from __future__ import annotations

import contextlib
import os
import select
import time
from pathlib import Path

COMMANDS_FD_ENV = "ECHO_JAX_AGENT_COMMANDS_FD"
ANSWERS_FD_ENV = "ECHO_JAX_AGENT_ANSWERS_FD"
INITIAL_DB_ENV = "ECHO_JAX_INITIAL_DB"
LIVE_DB_ENV = "ECHO_JAX_LIVE_DB"
_MAX_LINE = 4096

AGENT_PRELUDE = """
import os as _os, sqlite3 as _sqlite3, threading as _threading
from contextlib import closing as _closing
def _echo_jax_answer(line, initial, live):
    if line == b'reset\\n':
        with _closing(_sqlite3.connect(f'file:{initial}?mode=ro', uri=True)) as src:
            with _closing(_sqlite3.connect(live, timeout=10.0)) as dst:
                dst.execute('PRAGMA synchronous=OFF')
                src.backup(dst)
        return b'ok\\n'
    if line == b'snapshot\\n':
        with _closing(_sqlite3.connect(live, timeout=10.0)) as src:
            with _closing(_sqlite3.connect(':memory:')) as copy:
                src.backup(copy)
                data = copy.serialize()
        return b'bytes %d\\n' % len(data) + data
    return b'error unknown command\\n'
def _echo_jax_agent(commands, answers, initial, live):
    with open(commands, 'rb', 0) as cin, open(answers, 'wb', 0) as cout:
        for line in cin:
            try:
                cout.write(_echo_jax_answer(line, initial, live))
            except Exception as error:
                text = f'{type(error).__name__}: {error}'.replace('\\n', ' ')[:1000]
                cout.write(b'error ' + text.encode('utf-8', 'replace') + b'\\n')
_echo_jax_args = [_os.environ.pop(name) for name in (
    'ECHO_JAX_AGENT_COMMANDS_FD', 'ECHO_JAX_AGENT_ANSWERS_FD', 'ECHO_JAX_INITIAL_DB',
    'ECHO_JAX_LIVE_DB')]
_echo_jax_args[:2] = map(int, _echo_jax_args[:2])
_echo_jax_answer(b'reset\\n', *_echo_jax_args[2:])  # The live database, before the server runs.
_threading.Thread(target=_echo_jax_agent, args=_echo_jax_args, daemon=True).start()
"""


class AgentError(RuntimeError):
    """The world's agent did not reset or snapshot its database in time, or answered garbage."""


class AgentChannel:
    """The host's end: two pipes, and the descriptors the server inherits."""

    def __init__(self, timeout_s: float, max_snapshot_bytes: int):
        self.timeout_s = timeout_s
        self.max_snapshot_bytes = max_snapshot_bytes
        self._commands_read, self._commands = os.pipe()
        self._answers, self._answers_write = os.pipe()
        os.set_blocking(self._answers, False)

    def child_env(self, initial_db: Path, live_db: Path) -> dict[str, str]:
        return {
            COMMANDS_FD_ENV: str(self._commands_read),
            ANSWERS_FD_ENV: str(self._answers_write),
            INITIAL_DB_ENV: str(initial_db),
            LIVE_DB_ENV: str(live_db),
        }

    @property
    def child_fds(self) -> tuple[int, int]:
        return self._commands_read, self._answers_write

    def started(self) -> None:
        """The server holds its ends now: the host's copies go, so a dead server reads as EOF."""
        for fd in self.child_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._commands_read = self._answers_write = -1

    def reset(self) -> None:
        line = self._ask(b"reset\n")
        if line != b"ok":
            raise AgentError(f"reset failed: {line.decode('utf-8', 'replace')}")

    def snapshot(self, target: Path) -> None:
        """The live database's content, written to `target` (a host file, created anew)."""
        line = self._ask(b"snapshot\n")
        size_text = line.removeprefix(b"bytes ")
        if line == size_text or not size_text.isdigit():
            raise AgentError(f"snapshot failed: {line.decode('utf-8', 'replace')[:1000]}")
        size = int(size_text)
        if size > self.max_snapshot_bytes:
            raise AgentError(f"snapshot of {size:,} bytes is over {self.max_snapshot_bytes:,}")
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with open(fd, "wb") as out:
            while size:
                piece = self._read(min(size, 1 << 20))
                out.write(piece)
                size -= len(piece)

    def _ask(self, command: bytes) -> bytes:
        self._deadline = time.monotonic() + self.timeout_s
        self._drain()
        try:
            os.write(self._commands, command)
        except OSError as error:
            raise AgentError(f"the world's agent is gone: {error}") from None
        line = b""
        while not line.endswith(b"\n"):
            line += self._read(1)
            if len(line) > _MAX_LINE:
                raise AgentError("the world's agent answered an overlong line")
        return line[:-1]

    def _drain(self) -> None:
        """Whatever the agent sent unasked (a forged answer) is dropped, not taken as the next."""
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._answers, 1 << 16):
                pass

    def _read(self, size: int) -> bytes:
        poll = select.poll()
        poll.register(self._answers, select.POLLIN)
        while True:
            left = self._deadline - time.monotonic()
            if left <= 0 or not poll.poll(left * 1000):
                raise AgentError(f"the world's agent did not answer within {self.timeout_s:g}s")
            try:
                data = os.read(self._answers, size)
            except BlockingIOError:
                continue
            if not data:
                raise AgentError("the world's agent is gone (its pipe closed)")
            return data

    def close(self) -> None:
        for fd in (self._commands, self._answers, *self.child_fds):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._commands = self._answers = self._commands_read = self._answers_write = -1
