"""`RpcServer`: accept channels on a transport and serve RPC handlers on each."""

from __future__ import annotations

import logging

import trio

from swarm.errors import SwarmError
from swarm.identity import Identity
from swarm.net.config import DEFAULT_NET_CONFIG, NetConfig
from swarm.net.handshake import secure_inbound
from swarm.net.rpc import RpcConnection
from swarm.net.transport import TCPTransport, Transport

__all__ = ["RpcServer"]

log = logging.getLogger(__name__)


class RpcServer:
    """Serves ``rpc_<method>`` handlers of ``handlers`` to every peer that completes a
    handshake. Use ``port = await nursery.start(server.serve, host, 0)``; cancel the nursery
    to stop. Handshake failures are logged and close only that connection."""

    def __init__(
        self,
        identity: Identity,
        handlers: object,
        *,
        transport: Transport | None = None,
        swarm_key: bytes | None = None,
        config: NetConfig = DEFAULT_NET_CONFIG,
    ) -> None:
        self.identity = identity
        self.handlers = handlers
        self.transport: Transport = transport or TCPTransport()
        self.swarm_key = swarm_key
        self.config = config
        self.connections: set[RpcConnection] = set()
        self.handshake_failures = 0

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on ``host:port`` until cancelled; reports the bound port."""
        await self.transport.serve(self.handle_stream, host, port, task_status=task_status)

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        """Handshake on an accepted stream, then serve calls until the channel closes."""
        try:
            channel = await secure_inbound(
                stream, self.identity, swarm_key=self.swarm_key, config=self.config
            )
        except SwarmError as exc:
            self.handshake_failures += 1
            log.info("inbound handshake failed: %s", exc)
            return
        conn = RpcConnection(channel, self.handlers, self.config)
        self.connections.add(conn)
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)

    def statistics(self) -> dict[str, int]:
        return {"connections": len(self.connections), "handshake_failures": self.handshake_failures}
