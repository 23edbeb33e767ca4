"""Keep a world server on 127.0.0.1 only, whatever host and port its generated code asks for.

`LOOPBACK_LAUNCHER` runs the server's code with uvicorn.run pinned to 127.0.0.1:$PORT. Under the
sandbox the server has no network at all: `UNIX_SOCKET_PRELUDE` turns that uvicorn.run into one
on a listening Unix socket it inherits from the host (whose path is in the host's folder, out of
the server's reach), and a `LoopbackBridge` in the parent forwards 127.0.0.1:PORT to it.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from pathlib import Path

LOOPBACK = "127.0.0.1"
SOCKET_NAME = "server.sock"

# Runs server.py as __main__ after pinning uvicorn.run to 127.0.0.1 and $PORT, so a generated
# server that hard-codes another host or port still only listens on the loopback interface.
LOOPBACK_LAUNCHER = """
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

# Runs before the launcher (under the sandbox only) and turns its uvicorn.run into one on the
# listening Unix socket the host passed as descriptor $ECHO_JAX_SERVER_FD: the socket's path is
# in the host's folder, so the server can neither replace it nor point the bridge elsewhere.
UNIX_SOCKET_PRELUDE = """
import os
import uvicorn
_unix_run = uvicorn.run
_server_fd = int(os.environ.pop("ECHO_JAX_SERVER_FD"))
def _unix_socket_run(app, *args, **kwargs):
    kwargs.pop("host", None)
    kwargs.pop("port", None)
    kwargs.pop("uds", None)
    kwargs["fd"] = _server_fd
    return _unix_run(app, **kwargs)
uvicorn.run = _unix_socket_run
"""


def free_loopback_port() -> int:
    """A port free on 127.0.0.1 right now (another process may take it before the server)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


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


class LoopbackBridge:
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
