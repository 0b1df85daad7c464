"""What a reachable peer offers others: relaying and dial-back, announced under
`swarm.directory.relay_key`. A server does this while it is reachable
(`swarm.server.reachability`); ``swarm dht`` runs `serve_relay_node` beside its DHT node.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from swarm.dht import DHTNode
from swarm.directory import relay_key
from swarm.errors import SwarmError
from swarm.identity import Identity
from swarm.net.config import DEFAULT_NET_CONFIG, NetConfig
from swarm.net.dialback import DialBackService
from swarm.net.messages import RelayAnnouncement
from swarm.net.methods import HandlerRegistry
from swarm.net.relay import RelayLimits, RelayService
from swarm.net.rpc_server import RpcServer
from swarm.net.transport import TCPTransport, Transport

__all__ = ["keep_relay_announced", "serve_relay_node"]

log = logging.getLogger(__name__)


async def keep_relay_announced(
    dht: DHTNode,
    host: str,
    port: int,
    relay: RelayService,
    ttl: float = 60.0,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Announce ``relay`` at ``host:port`` under `relay_key` every ``ttl / 2`` (forever);
    reports started after the first announcement."""
    first = True
    while True:
        stats = relay.statistics()
        ann = RelayAnnouncement(
            host=host,
            port=port,
            circuits=min(stats.circuits, relay.limits.max_circuits),
            max_circuits=relay.limits.max_circuits,
        )
        try:
            await dht.announce(relay_key(), ann.to_wire(), ttl=ttl)
        except SwarmError as exc:
            log.info("announcing the relay failed: %s", exc)
        if first:
            first = False
            task_status.started()
        await trio.sleep(ttl / 2)


async def serve_relay_node(
    identity: Identity,
    dht: DHTNode,
    host: str,
    port: int,
    *,
    transport: Transport | None = None,
    swarm_key: bytes | None = None,
    limits: RelayLimits | None = None,
    config: NetConfig = DEFAULT_NET_CONFIG,
    ttl: float = 60.0,
    wrap_handlers: Callable[[HandlerRegistry], HandlerRegistry] | None = None,
    task_status: trio.TaskStatus[tuple[int, RelayService]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on TCP ``host:port`` (0: any free port), relay and dial back for others, and
    announce it; reports ``(bound port, relay)`` once announced. Runs until cancelled.
    Raises `OSError` if the port cannot be bound. ``identity`` must be ``dht``'s (its
    record's signer is the `PeerId` dialers expect). ``wrap_handlers`` is for tests only
    (a lying dial-back helper wraps the honest handlers)."""
    transport = transport or TCPTransport()
    relay = RelayService(identity, swarm_key=swarm_key, limits=limits)
    dial_back = DialBackService(identity, transport=transport, swarm_key=swarm_key, config=config)
    handlers = HandlerRegistry([dial_back.binding(), relay.binding()])
    if wrap_handlers is not None:
        handlers = wrap_handlers(handlers)
    rpc = RpcServer(
        identity,
        handlers,
        transport=transport,
        swarm_key=swarm_key,
        config=config,
        relay=relay,
    )
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(rpc.serve, host, port)
        await nursery.start(keep_relay_announced, dht, host, bound, relay, ttl)
        task_status.started((bound, relay))
