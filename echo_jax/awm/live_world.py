"""A world server with its MCP client, restarted whole when either fails.

`WORLD_FAILURES` are the errors that mean the world itself failed (dead, hung, 5xx, a broken
database), not the agent: the episode in flight is rerun on a restarted world.
"""

from __future__ import annotations

import sqlite3

from echo_jax.awm.mcp_client import McpClient, WorldUnavailable
from echo_jax.awm.world_format import World
from echo_jax.awm.world_server import WorldServer, WorldServerError

WORLD_FAILURES = (WorldUnavailable, WorldServerError, sqlite3.Error)


class LiveWorld:
    """A started server with an initialised client, restartable after a failure."""

    def __init__(self, world: World, timeout_s: float = 30.0):
        self.world = world
        self.timeout_s = timeout_s
        self.server: WorldServer | None = None
        self.client: McpClient | None = None

    def open(self) -> None:
        self.server = WorldServer(self.world).start()
        self.client = McpClient(self.server.mcp_url, timeout_s=self.timeout_s)
        self.client.initialize()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.server is not None:
            self.server.stop()
            self.server = None

    def restart(self) -> None:
        self.close()
        self.open()
