"""HTTP POSTs to a world server whose every reply has a total deadline and a size cap.

A world server is untrusted code: a reply may trickle in a byte at a time (a per-read timeout,
as `requests` has, never fires), announce or stream gigabytes, or stop mid-chunk. Here one
watchdog timer per request shuts the socket down at the reply's deadline, whatever phase the
read is in (headers or body), and the body is read in bounded pieces up to a cap. Every failure
is a `ReplyFailed` saying why; `never_sent` marks the ones where the request certainly did not
reach the server (connection refused), which even a non-idempotent call may retry.
"""

from __future__ import annotations

import contextlib
import http.client
import select
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass

_READ_PIECE = 1 << 16
# What a request on a connection the server has closed meets, before any reply byte.
_CLOSED = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


# A kept-alive connection idle longer than this is not reused: servers close idle ones (uvicorn
# after 5 s), and a request sent as the server closes is lost with the connection.
REUSE_IDLE_S = 2.0


class ReplyFailed(RuntimeError):
    """No whole reply within the deadline and the size cap."""

    def __init__(
        self, why: str, *, never_sent: bool = False, timed_out: bool = False, closed: bool = False
    ):
        super().__init__(why)
        self.never_sent = never_sent
        self.timed_out = timed_out
        self.closed = closed  # The server closed the connection before any reply.


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


def _dropped(connection: http.client.HTTPConnection) -> bool:
    """An idle keep-alive connection that is readable was closed by the server (or holds
    bytes no request asked for): it must not carry the next request."""
    if connection.sock is None:  # Closed by http.client itself (the server said so): reconnects.
        return False
    poll = select.poll()
    poll.register(connection.sock, select.POLLIN)
    return bool(poll.poll(0))


class BoundedHttp:
    """POSTs to one http:// URL, reusing one keep-alive connection when it is free."""

    def __init__(self, url: str, *, max_reply_bytes: int):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"not an http:// URL: {url!r}")
        self._host, self._port = parts.hostname, parts.port or 80
        self._path = parts.path or "/"
        self.max_reply_bytes = max_reply_bytes
        self._idle: http.client.HTTPConnection | None = None
        self._idle_since = 0.0
        self._lock = threading.Lock()

    def post(self, body: bytes, headers: dict[str, str], timeout_s: float) -> Reply:
        """One request and its whole reply. A kept-alive connection the server closed just as
        the request went out (no reply byte came back) is retried once on a new connection,
        within the same deadline: the server closes only idle connections, so it never saw
        the request."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            connection, idle_since, self._idle = self._idle, self._idle_since, None
        fresh = (
            connection is None
            or time.monotonic() - idle_since > REUSE_IDLE_S
            or _dropped(connection)
        )
        if fresh and connection is not None:
            connection.close()
        if fresh:
            connection = http.client.HTTPConnection(self._host, self._port, timeout=timeout_s)
        try:
            reply = self._exchange(connection, body, headers, deadline, timeout_s)
        except ReplyFailed as error:
            connection.close()
            if fresh or not error.closed:
                raise
            connection = http.client.HTTPConnection(self._host, self._port, timeout=timeout_s)
            try:
                reply = self._exchange(connection, body, headers, deadline, timeout_s)
            except BaseException:
                connection.close()
                raise
        except BaseException:
            connection.close()
            raise
        with self._lock:
            if self._idle is None and reply.headers.get("connection") != "close":
                connection, self._idle, self._idle_since = None, connection, time.monotonic()
        if connection is not None:
            connection.close()
        return reply

    def _exchange(self, connection, body, headers, deadline, timeout_s) -> Reply:
        try:
            if connection.sock is None:
                connection.connect()
        except ConnectionRefusedError as error:
            raise ReplyFailed(f"connection refused: {error}", never_sent=True) from None
        except (OSError, http.client.HTTPException) as error:
            raise ReplyFailed(f"cannot connect: {error!r}") from None
        sock = connection.sock
        expired = threading.Event()

        def cut_off() -> None:
            expired.set()
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

        watchdog = threading.Timer(max(deadline - time.monotonic(), 0.0), cut_off)
        watchdog.daemon = True
        watchdog.start()
        answered = False  # Whether a status line came back.
        try:
            connection.request("POST", self._path, body=body, headers=headers)
            response = connection.getresponse()
            answered = True
            reply = Reply(
                response.status,
                {name.lower(): value for name, value in response.getheaders()},
                self._read_body(response),
            )
            if expired.is_set():  # Cut off: what was read is the start of a reply at best.
                raise TimeoutError
            return reply
        except ReplyFailed:
            raise
        except (OSError, http.client.HTTPException, ValueError) as error:
            if expired.is_set() or isinstance(error, TimeoutError):
                raise ReplyFailed(f"no whole reply within {timeout_s:g}s", timed_out=True) from None
            closed = isinstance(error, _CLOSED) and not answered
            raise ReplyFailed(f"broken reply: {error!r}", closed=closed) from None
        finally:
            watchdog.cancel()

    def _read_body(self, response: http.client.HTTPResponse) -> bytes:
        announced = response.getheader("content-length")
        if announced and announced.isdigit() and int(announced) > self.max_reply_bytes:
            raise ReplyFailed(
                f"reply of {int(announced):,} bytes is over the cap of {self.max_reply_bytes:,}"
            )
        pieces, size = [], 0
        while True:
            piece = response.read(_READ_PIECE)
            if not piece:
                break
            size += len(piece)
            if size > self.max_reply_bytes:
                raise ReplyFailed(f"reply is over the cap of {self.max_reply_bytes:,} bytes")
            pieces.append(piece)
        return b"".join(pieces)

    def close(self) -> None:
        with self._lock:
            connection, self._idle = self._idle, None
        if connection is not None:
            connection.close()
