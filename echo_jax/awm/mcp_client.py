"""A small synchronous MCP client for fastapi-mcp's streamable-HTTP transport.

fastapi-mcp mounts the MCP SDK's StreamableHTTPSessionManager at /mcp: every JSON-RPC message is
a POST; `initialize` returns an `mcp-session-id` header that later requests must echo (with the
negotiated `mcp-protocol-version`); notifications are answered 202 with no body; responses come as
`application/json` or, depending on the server's configuration, as a `text/event-stream` whose
`data:` lines carry the JSON-RPC message. Tool failures are not JSON-RPC errors: they are results
with `isError: true` and the failure text as content (e.g. "Unknown tool: x", "Input validation
error: ...", "Error calling x. Status code: 404. Response: {...}").

The server is untrusted code: every reply has a total deadline and a size cap
(`bounded_http`), and anything but a well-formed reply of the expected shape (wrong types,
nesting too deep to parse, a pagination that does not end) is a `WorldUnavailable` with the
reason, never another exception.
"""

from __future__ import annotations

import copy
import itertools
import json
import time
from dataclasses import dataclass
from typing import Any

from echo_jax.awm.bounded_http import BoundedHttp, Reply, ReplyFailed

PROTOCOL_VERSION = "2025-06-18"
_CLIENT_INFO = {"name": "echo-jax-awm", "version": "0.1.0"}
MAX_REPLY_BYTES = 16 << 20
MAX_TOOL_PAGES = 100


class McpError(RuntimeError):
    """The server answered a request with a JSON-RPC error object."""

    def __init__(self, code: int, message: str, data: Any = None):
        super().__init__(f"MCP error {code}: {message}")
        self.code = code
        self.message = message
        self.data = data


class WorldUnavailable(RuntimeError):
    """The world server could not be reached or failed at the transport level (dead, hung, 5xx)."""


@dataclass(frozen=True)
class ToolCallResult:
    """A tools/call result: the text content joined, and whether the server flagged an error."""

    text: str
    is_error: bool


def _parse_sse(body: str) -> list[Any]:
    """Return the JSON messages carried by the `data:` lines of a text/event-stream body."""
    messages, data_lines = [], []
    for line in [*body.splitlines(), ""]:
        if line.startswith("data:"):
            data_lines.append(line[5:].lstrip())
        elif not line and data_lines:
            messages.append(json.loads("\n".join(data_lines)))
            data_lines = []
    return messages


class McpClient:
    """Speaks MCP JSON-RPC over HTTP to one server, on a reused keep-alive connection.

    Requests that cannot change the world (initialize, tools/list) are retried with exponential
    backoff on connection errors and 5xx answers. tools/call is retried only when the connection
    was refused, i.e. the request certainly never reached the server: a call that may have run
    must not be replayed against the database, so other failures raise WorldUnavailable and the
    caller discards the episode. `timeout_s` bounds each whole reply, not each read.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.1,
        max_reply_bytes: int = MAX_REPLY_BYTES,
    ):
        self.url = url
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self._http = BoundedHttp(url, max_reply_bytes=max_reply_bytes)
        self._headers = {
            "Accept": "application/json, text/event-stream",
            "Content-Type": "application/json",
        }
        self._ids = itertools.count(1)
        self.server_info: dict[str, Any] | None = None
        self._tools: list[dict[str, Any]] | None = None

    def initialize(self) -> dict[str, Any]:
        """Open an MCP session; later requests carry its id and the negotiated protocol."""
        result, reply = self._request(
            "initialize",
            {"protocolVersion": PROTOCOL_VERSION, "capabilities": {}, "clientInfo": _CLIENT_INFO},
            idempotent=True,
        )
        session_id = reply.headers.get("mcp-session-id")
        if session_id:
            self._headers["mcp-session-id"] = session_id
        version = result.get("protocolVersion", PROTOCOL_VERSION)
        if not isinstance(version, str):
            raise WorldUnavailable(f"initialize: protocolVersion is no string: {version!r:.200}")
        self._headers["mcp-protocol-version"] = version
        self._notify("notifications/initialized")
        self.server_info = result
        return result

    def list_tools(self) -> list[dict[str, Any]]:
        """All tools with their JSON schemas, following pagination cursors (at most
        MAX_TOOL_PAGES pages); asked once per client, since a server's tools are its code's
        routes (resets restore data, not code) and listing them costs the server more than a
        tool call. A copy each time."""
        if self._tools is None:
            tools: list[dict[str, Any]] = []
            params: dict[str, Any] = {}
            for _ in range(MAX_TOOL_PAGES):
                result, _ = self._request("tools/list", params, idempotent=True)
                page = result.get("tools", [])
                if not isinstance(page, list) or not all(
                    isinstance(tool, dict) and isinstance(tool.get("name"), str) for tool in page
                ):
                    raise WorldUnavailable(f"tools/list: malformed tools: {page!r:.200}")
                tools.extend(page)
                cursor = result.get("nextCursor")
                if not cursor:
                    break
                params = {"cursor": cursor}
            else:
                raise WorldUnavailable(f"tools/list: still paginating after {MAX_TOOL_PAGES} pages")
            self._tools = tools
        return copy.deepcopy(self._tools)

    def call_tool(self, name: str, arguments: dict[str, Any]) -> ToolCallResult:
        """Call a tool; a tool-level failure comes back as ToolCallResult(is_error=True)."""
        result, _ = self._request(
            "tools/call", {"name": name, "arguments": arguments}, idempotent=False
        )
        content = result.get("content", [])
        if not isinstance(content, list) or not all(isinstance(item, dict) for item in content):
            raise WorldUnavailable(f"tools/call: malformed content: {content!r:.200}")
        parts = []
        for item in content:
            text = item.get("text") if item.get("type") == "text" else json.dumps(item)
            if not isinstance(text, str):
                raise WorldUnavailable(f"tools/call: text content is no string: {text!r:.200}")
            parts.append(text)
        return ToolCallResult(text="\n".join(parts), is_error=bool(result.get("isError")))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> McpClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _notify(self, method: str) -> None:
        self._post({"jsonrpc": "2.0", "method": method}, idempotent=True)

    def _request(
        self, method: str, params: dict[str, Any], *, idempotent: bool
    ) -> tuple[dict[str, Any], Reply]:
        request_id = next(self._ids)
        message = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
        reply = self._post(message, idempotent=idempotent)
        found = self._find_reply(reply, request_id, method)
        if "error" in found:
            error = found["error"]
            if not isinstance(error, dict):
                raise WorldUnavailable(f"{method}: malformed error: {error!r:.200}")
            code = error.get("code", 0)
            code = code if isinstance(code, int) else 0
            raise McpError(code, str(error.get("message", ""))[:2000], error.get("data"))
        result = found.get("result", {})
        if not isinstance(result, dict):
            raise WorldUnavailable(f"{method}: result is no JSON object: {result!r:.200}")
        return result, reply

    def _send(self, message: dict[str, Any]) -> Reply:
        """One POST (tests replace it to inject faults)."""
        body = json.dumps(message).encode("utf-8")
        return self._http.post(body, self._headers, self.timeout_s)

    def _post(self, message: dict[str, Any], *, idempotent: bool) -> Reply:
        method = message["method"]
        for attempt in range(self.retries + 1):
            last_attempt = attempt == self.retries
            try:
                reply = self._send(message)
            except ReplyFailed as error:
                # Refused connections never reached the server, so even tools/call is safe.
                if last_attempt or not (idempotent or error.never_sent):
                    raise WorldUnavailable(f"{method}: {error}") from None
            else:
                if reply.status < 500:
                    return reply
                if last_attempt or not idempotent:
                    raise WorldUnavailable(f"{method}: HTTP {reply.status}: {reply.text[:500]}")
            time.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable: the last attempt returns or raises")

    @staticmethod
    def _find_reply(reply: Reply, request_id: int, method: str) -> dict[str, Any]:
        """Extract the JSON-RPC reply with our id from a JSON or SSE body.

        A 4xx answer is a transport problem (unknown session, bad headers), not a tool failure.
        """
        if reply.status >= 400:
            raise WorldUnavailable(f"{method}: HTTP {reply.status}: {reply.text[:500]}")
        content_type = reply.headers.get("content-type", "")
        try:
            if content_type.startswith("text/event-stream"):
                messages = _parse_sse(reply.text)
            else:
                body = json.loads(reply.body)
                messages = body if isinstance(body, list) else [body]
        except (ValueError, RecursionError) as error:
            raise WorldUnavailable(
                f"{method}: HTTP {reply.status} with unparsable body "
                f"({type(error).__name__}): {reply.text[:500]!r}"
            ) from None
        for message in messages:
            if isinstance(message, dict) and message.get("id") == request_id:
                return message
        raise WorldUnavailable(
            f"{method}: HTTP {reply.status} without a reply to request {request_id}: "
            f"{reply.text[:500]!r}"
        )
