"""Helpers of the hostile-world suite: a scripted HTTP server on 127.0.0.1, and the checks that
follow every attack (canary file and folder unchanged, no process left)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
from pathlib import Path

MARKER = "echohostile"  # Hostile code names its processes so (/proc/self/comm) to be counted.


class ScriptedServer:
    """Answers each request on 127.0.0.1 with `self.script(request_bytes, connection)`."""

    def __init__(self):
        self.script = None
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/mcp"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket) -> None:
        with connection, contextlib.suppress(OSError):
            while True:
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = connection.recv(65536)
                    if not chunk:
                        return
                    request += chunk
                head, _, body = request.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                while len(body) < length:
                    body += connection.recv(65536)
                self.script(body, connection)

    def close(self) -> None:
        self._listener.close()


def snapshot(path: Path) -> dict[str, str]:
    """Names and content hashes of everything under `path` (or of the file itself)."""
    paths = [path] if path.is_file() else sorted(path.rglob("*"))
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir" for p in paths
    }


def marked_processes() -> list[int]:
    """Live threads hostile code started and named MARKER, anywhere on the machine."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                for task in os.listdir(f"/proc/{entry}/task"):
                    stat = Path(f"/proc/{entry}/task/{task}/stat").read_text()
                    name, state = stat.split("(", 1)[1].rsplit(")", 1)
                    if name == MARKER and state.split()[0] != "Z":
                        found.append(int(task))
    return found


def descendants(pid: int | None = None) -> set[int]:
    """Live processes below `pid` (default: this one)."""
    pid = os.getpid() if pid is None else pid
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError):
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                if fields[0] != "Z":
                    children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def settle(condition, timeout_s: float = 5.0) -> bool:
    """Wait until `condition()` holds (killed processes take a moment to go)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()
