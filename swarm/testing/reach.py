"""Reachability seams for tests and benchmarks: peers nobody can dial, relays that are
watched or tampered with, a lying dial-back helper, and relay nodes in this trio loop.

    async with open_relay_node(local.dht_address) as relay:      # a `swarm dht`-like relay
        await local.add_server(LayerRange(4, 8), transport=Undialable())
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from swarm.dht import DHTConfig, DHTNode
from swarm.identity import Identity
from swarm.net.messages import (
    DialBackRequest,
    DialBackResponse,
    PunchAddress,
    PunchConnect,
    PunchSync,
)
from swarm.net.methods import HandlerRegistry, TypedStream
from swarm.net.punch import PunchPoint
from swarm.net.relay import RelayLimits, RelayService
from swarm.net.rpc import CallContext
from swarm.net.surface import DIAL_BACK, HOLE_PUNCH, PunchUp
from swarm.net.transport import StreamHandler, TCPTransport, Transport
from swarm.server.handlers import ServingHandlers
from swarm.server.relay_node import serve_relay_node
from swarm.types import PeerId, Reachability

__all__ = [
    "LyingDialBack",
    "NeverPunches",
    "RelayNode",
    "TappedTransport",
    "Undialable",
    "open_relay_node",
]


class Undialable:
    """Dials out like ``inner``; every inbound connection is closed at once, as a NAT or a
    firewall in front of the peer would. Relayed circuits still reach it: they arrive on
    connections it dialed out itself."""

    def __init__(self, inner: Transport | None = None) -> None:
        self._inner = inner or TCPTransport()
        self.refused = 0

    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        return await self._inner.connect(host, port)

    async def serve(
        self,
        handler: StreamHandler,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async def drop(stream: trio.abc.Stream) -> None:
            self.refused += 1
            await trio.aclose_forcefully(stream)

        await self._inner.serve(drop, host, port, task_status=task_status)


class _TappedStream(trio.abc.Stream):
    def __init__(self, inner: trio.abc.Stream, tap: TappedTransport) -> None:
        self._inner = inner
        self._tap = tap
        self._seen = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = bytearray(await self._inner.receive_some(max_bytes))
        flip = self._tap.flip_at
        if flip is not None and self._seen <= flip < self._seen + len(data):
            data[flip - self._seen] ^= 0x01
            self._tap.flipped += 1
        self._seen += len(data)
        self._tap.received += data
        return bytes(data)

    async def aclose(self) -> None:
        await self._inner.aclose()


class TappedTransport:
    """Serves like ``inner``, recording every byte its accepted streams receive in
    ``received``; with ``flip_at`` set, the byte at that offset of each accepted stream
    is flipped before anyone reads it (a relay that tampers)."""

    def __init__(self, inner: Transport | None = None, flip_at: int | None = None) -> None:
        self._inner = inner or TCPTransport()
        self.flip_at = flip_at
        self.received = bytearray()
        self.flipped = 0

    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        return await self._inner.connect(host, port)

    async def serve(
        self,
        handler: StreamHandler,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async def tapped(stream: trio.abc.Stream) -> None:
            await handler(_TappedStream(stream, self))

        await self._inner.serve(tapped, host, port, task_status=task_status)


class LyingDialBack:
    """A helper's ``dial_back`` that answers ``verdict`` without dialing anything."""

    def __init__(self, verdict: Reachability = Reachability.UNREACHABLE) -> None:
        self._verdict = verdict
        self.lies = 0

    async def rpc_dial_back(self, request: DialBackRequest, ctx: CallContext) -> DialBackResponse:
        self.lies += 1
        return DialBackResponse(self._verdict)

    def wrap(self, honest: HandlerRegistry) -> HandlerRegistry:
        """The helper's registry with this liar in place of its honest ``dial_back``."""
        return honest.replace(DIAL_BACK.bind(self.rpc_dial_back))


class NeverPunches:
    """A relayed peer's ``hole_punch`` that goes through the exchange but never dials, and
    names an address where nothing listens (a port it bound and let go): as a peer behind a
    NAT that no SYN gets through looks to the initiator. Counts the exchanges in ``calls``."""

    def __init__(self) -> None:
        self.calls = 0

    async def rpc_hole_punch(
        self, stream: TypedStream[PunchConnect, PunchUp], ctx: CallContext
    ) -> None:
        self.calls += 1
        await stream.receive(PunchConnect, timeout=10.0)
        with PunchPoint("127.0.0.1") as gone:
            dead = gone.address
        await stream.send(PunchConnect(addresses=(PunchAddress(host=dead.host, port=dead.port),)))
        await stream.receive(PunchSync, timeout=10.0)

    def wrap(self, handlers: ServingHandlers) -> HandlerRegistry:
        """A server's registry (``wrap_handlers``) that serves this ``hole_punch``."""
        return handlers.registry().with_bindings([HOLE_PUNCH.bind(self.rpc_hole_punch)])

    def binding_for(self, honest: HandlerRegistry) -> HandlerRegistry:
        """``honest`` with this ``hole_punch`` in place of (or besides) its own."""
        binding = HOLE_PUNCH.bind(self.rpc_hole_punch)
        if HOLE_PUNCH.name in honest.names:
            return honest.replace(binding)
        return honest.with_bindings([binding])


@dataclass
class RelayNode:
    """A DHT node with relaying and dial-back on TCP, as ``swarm dht`` runs one."""

    peer_id: PeerId
    port: int
    relay: RelayService
    scope: trio.CancelScope
    stopped: trio.Event = field(default_factory=trio.Event)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def kill(self, timeout: float = 10.0) -> None:
        """Stop it abruptly (its connections reset) and wait until it is gone."""
        self.scope.cancel()
        with trio.fail_after(timeout):
            await self.stopped.wait()


@asynccontextmanager
async def open_relay_node(
    dht_address: str,
    *,
    transport: Transport | None = None,
    limits: RelayLimits | None = None,
    lie: Reachability | None = None,
    seed: bytes | None = None,
) -> AsyncIterator[RelayNode]:
    """A relay node joined to the DHT at ``dht_address``, announced before this yields.
    ``lie``: its dial-backs all answer that verdict (`LyingDialBack`)."""
    identity = Identity.from_seed(seed) if seed else Identity.generate()
    wrap = LyingDialBack(lie).wrap if lie is not None else None
    scope = trio.CancelScope()
    async with trio.open_nursery() as nursery:

        async def run(*, task_status: trio.TaskStatus[tuple[int, RelayService]]) -> None:
            try:
                with scope:
                    config = DHTConfig(initial_peers=(dht_address,))
                    async with DHTNode.open(identity, config) as dht:
                        await serve_relay_node(
                            identity, dht, "127.0.0.1", 0, transport=transport,
                            limits=limits, wrap_handlers=wrap, task_status=task_status,
                        )  # fmt: skip
            finally:
                node.stopped.set()

        node = RelayNode(identity.peer_id, 0, RelayService(identity), scope)
        with trio.fail_after(30):
            node.port, node.relay = await nursery.start(run)
        try:
            yield node
        finally:
            nursery.cancel_scope.cancel()
