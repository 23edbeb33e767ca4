"""The host's own I/O with world processes, where load opens race windows: a kept-alive
connection the server closes as the next request goes out, a log removed while it is read."""

import socket
import threading

from echo_jax.awm.bounded_http import BoundedHttp


def _read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))  # fmt: skip
    while len(body) < length:
        body += conn.recv(4096)
    return head


def _reply(conn: socket.socket, text: bytes) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(text), text))


def test_a_request_on_a_connection_the_server_closes_goes_out_again_on_a_new_one():
    """What uvicorn does to an idle connection: the request goes out once more on a new one,
    within its deadline."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    connections = []

    def serve():
        first, _ = listener.accept()
        connections.append(first)
        _read_request(first)
        _reply(first, b"first")
        _read_request(first)  # The second request arrives on the kept-alive connection ...
        first.close()  # ... which the server closes without a reply.
        second, _ = listener.accept()
        connections.append(second)
        _read_request(second)
        _reply(second, b"second")
        second.close()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        client = BoundedHttp(f"http://127.0.0.1:{port}/mcp", max_reply_bytes=1 << 20)
        assert client.post(b"{}", {"Content-Type": "application/json"}, 5.0).body == b"first"
        assert client.post(b"{}", {"Content-Type": "application/json"}, 5.0).body == b"second"
    finally:
        server.join(timeout=5)
        listener.close()
    assert len(connections) == 2 and not server.is_alive()


def test_the_tail_of_an_output_file_that_is_gone_is_empty(tmp_path):
    """A worker's failure path reads its log while a close may be removing it: the failure is
    still reported (an exception there left the worker's requests waiting forever)."""
    from echo_jax.awm.child_process import read_tail

    log = tmp_path / "worker.log"
    log.write_bytes(b"x" * 100 + b"last words")
    assert read_tail(log, 10) == "last words"
    log.unlink()
    assert read_tail(log, 10) == ""
