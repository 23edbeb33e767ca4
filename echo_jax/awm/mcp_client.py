"""A small synchronous MCP client for fastapi-mcp's streamable-HTTP transport.

fastapi-mcp mounts the MCP SDK's StreamableHTTPSessionManager at /mcp: every JSON-RPC message is
a POST; `initialize` returns an `mcp-session-id` header that later requests must echo (with the
negotiated `mcp-protocol-version`); notifications are answered 202 with no body; responses come as
`application/json` or, depending on the server's configuration, as a `text/event-stream` whose
`data:` lines carry the JSON-RPC message. Tool failures are not JSON-RPC errors: they are results
with `isError: true` and the failure text as content (e.g. "Unknown tool: x", "Input validation
error: ...", "Error calling x. Status code: 404. Response: {...}").
"""

from __future__ import annotations

import copy
import itertools
import json
import time
from dataclasses import dataclass
from typing import Any

import requests

PROTOCOL_VERSION = "2025-06-18"
_CLIENT_INFO = {"name": "echo-jax-awm", "version": "0.1.0"}


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


def _parse_sse(body: str) -> list[dict[str, Any]]:
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
    """Speaks MCP JSON-RPC over HTTP to one server with a pooled `requests.Session`.

    Requests that cannot change the world (initialize, tools/list) are retried with exponential
    backoff on connection errors and 5xx answers. tools/call is retried only when the connection
    was refused, i.e. the request certainly never reached the server: a call that may have run
    must not be replayed against the database, so other failures raise WorldUnavailable and the
    caller discards the episode.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.1,
    ):
        self.url = url
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self._http = requests.Session()
        self._headers = {
            "Accept": "application/json, text/event-stream",
            "Content-Type": "application/json",
        }
        self._ids = itertools.count(1)
        self.server_info: dict[str, Any] | None = None
        self._tools: list[dict[str, Any]] | None = None

    def initialize(self) -> dict[str, Any]:
        """Open an MCP session; later requests carry its id and the negotiated protocol."""
        result, response = self._request(
            "initialize",
            {"protocolVersion": PROTOCOL_VERSION, "capabilities": {}, "clientInfo": _CLIENT_INFO},
            idempotent=True,
        )
        session_id = response.headers.get("mcp-session-id")
        if session_id:
            self._headers["mcp-session-id"] = session_id
        self._headers["mcp-protocol-version"] = result.get("protocolVersion", PROTOCOL_VERSION)
        self._notify("notifications/initialized")
        self.server_info = result
        return result

    def list_tools(self) -> list[dict[str, Any]]:
        """All tools with their JSON schemas, following pagination cursors; asked once per
        client, since a server's tools are its code's routes (resets restore data, not code)
        and listing them costs the server more than a tool call. A copy each time."""
        if self._tools is None:
            tools: list[dict[str, Any]] = []
            params: dict[str, Any] = {}
            while True:
                result, _ = self._request("tools/list", params, idempotent=True)
                tools.extend(result.get("tools", []))
                cursor = result.get("nextCursor")
                if not cursor:
                    break
                params = {"cursor": cursor}
            self._tools = tools
        return copy.deepcopy(self._tools)

    def call_tool(self, name: str, arguments: dict[str, Any]) -> ToolCallResult:
        """Call a tool; a tool-level failure comes back as ToolCallResult(is_error=True)."""
        result, _ = self._request(
            "tools/call", {"name": name, "arguments": arguments}, idempotent=False
        )
        parts = [
            item["text"] if item.get("type") == "text" else json.dumps(item)
            for item in result.get("content", [])
        ]
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
    ) -> tuple[dict[str, Any], requests.Response]:
        request_id = next(self._ids)
        message = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
        response = self._post(message, idempotent=idempotent)
        reply = self._find_reply(response, request_id, method)
        if "error" in reply:
            error = reply["error"]
            raise McpError(error.get("code", 0), error.get("message", ""), error.get("data"))
        return reply.get("result", {}), response

    def _post(self, message: dict[str, Any], *, idempotent: bool) -> requests.Response:
        method = message["method"]
        for attempt in range(self.retries + 1):
            last_attempt = attempt == self.retries
            try:
                response = self._http.post(
                    self.url, json=message, headers=self._headers, timeout=self.timeout_s
                )
            except requests.ConnectionError as error:
                # Refused connections never reached the server, so even tools/call is safe.
                never_sent = "refused" in str(error).lower()
                if last_attempt or not (idempotent or never_sent):
                    raise WorldUnavailable(f"{method}: {error}") from error
            except requests.Timeout as error:
                if last_attempt or not idempotent:
                    raise WorldUnavailable(
                        f"{method}: timed out after {self.timeout_s}s"
                    ) from error
            else:
                if response.status_code < 500:
                    return response
                if last_attempt or not idempotent:
                    raise WorldUnavailable(
                        f"{method}: HTTP {response.status_code}: {response.text[:500]}"
                    )
            time.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable: the last attempt returns or raises")

    @staticmethod
    def _find_reply(response: requests.Response, request_id: int, method: str) -> dict[str, Any]:
        """Extract the JSON-RPC reply with our id from a JSON or SSE body.

        A 4xx answer is a transport problem (unknown session, bad headers), not a tool failure.
        """
        if response.status_code >= 400:
            raise WorldUnavailable(f"{method}: HTTP {response.status_code}: {response.text[:500]}")
        content_type = response.headers.get("content-type", "")
        try:
            if content_type.startswith("text/event-stream"):
                messages = _parse_sse(response.text)
            else:
                body = response.json()
                messages = body if isinstance(body, list) else [body]
        except ValueError as error:
            raise WorldUnavailable(
                f"{method}: HTTP {response.status_code} with unparsable body: "
                f"{response.text[:500]!r}"
            ) from error
        for message in messages:
            if isinstance(message, dict) and message.get("id") == request_id:
                return message
        raise WorldUnavailable(
            f"{method}: HTTP {response.status_code} without a reply to request {request_id}: "
            f"{response.text[:500]!r}"
        )
