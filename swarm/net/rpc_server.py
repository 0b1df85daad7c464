"""`RpcServer`: accept channels on a transport and serve RPC handlers on each, within limits.

Every inbound connection holds a slot from accept to close. The limits (all in `NetConfig`):

- per IP (``max_connections_per_ip``; a public IPv6 /64 counts as one IP, `host_key`):
  checked at accept; past it the connection is closed before the handshake;
- unauthenticated (``max_handshakes``): a new connection past it closes the oldest one still
  in its handshake from the address with the most of them; each has ``handshake_timeout``;
- per peer (``max_connections_per_peer``) and in all (``max_connections``): decided when the
  handshake has proven the dialer's `PeerId`. At the global cap the server closes an idle
  channel (from the address holding the most channels, the one idle the longest); with none
  idle it refuses the newcomer. Refusals reach the
  dialer as `LimitExceeded` through the handshake's confirmation;
- idle (``idle_timeout``): a channel with no call, stream or frame for that long is closed;
- bytes being received (``max_receive_bytes``): one `ReceiveBudget` shared by every channel.

With a `RelayService` (``relay=``), a connection whose hello names another peer that holds
a reservation here, or is a relayed peer's connect-back, leaves the handshake table and is
the relay's (its quotas apply; it keeps its per-IP slot).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import trio

from swarm.errors import LimitExceeded, SwarmError
from swarm.identity import Identity
from swarm.net.channel import ExactReader, ReceiveBudget
from swarm.net.config import DEFAULT_NET_CONFIG, NetConfig
from swarm.net.handshake import Refusal, secure_inbound
from swarm.net.hello import Hello, read_hello
from swarm.net.methods import HandlerRegistry
from swarm.net.relay import RelayService
from swarm.net.rpc import RpcConnection
from swarm.net.transport import RelayedStream, TCPTransport, Transport, remote_host
from swarm.types import PeerId

__all__ = ["RpcServer", "RpcServerStatistics"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RpcServerStatistics:
    """Counts of an `RpcServer`: open now, and totals since it started."""

    connections: int  # authenticated channels open
    handshaking: int  # connections still in their handshake
    handshake_failures: int
    refused_per_ip: int
    refused_per_peer: int
    refused_full: int  # at max_connections with no idle channel to close
    refused_unexpected: int  # a punched connection reached by another peer than the caller
    evicted_handshakes: int  # closed to make room under max_handshakes
    evicted_idle: int  # closed to make room under max_connections
    closed_idle: int  # closed by idle_timeout
    receive_budget_in_use: int
    receive_budget_refused: int


class _Slot:
    """One inbound connection, from accept to close."""

    __slots__ = ("conn", "host", "live", "peer_id", "scope")

    def __init__(self, host: str | None) -> None:
        self.host = host
        self.scope = trio.CancelScope()
        self.peer_id: PeerId | None = None
        self.conn: RpcConnection | None = None
        self.live = True  # counted in the server's tables


class RpcServer:
    """Serves the methods of ``handlers`` (a `HandlerRegistry`) to every peer that completes a
    handshake. Use ``port = await nursery.start(server.serve, host, 0)``; cancel the nursery
    to stop. Handshake failures are logged and close only that connection.

    ``receive_budget`` (default: a new one of ``config.max_receive_bytes``) may be shared
    with the process's `ConnectionPool`, so that all its channels draw on one budget.
    """

    def __init__(
        self,
        identity: Identity,
        handlers: HandlerRegistry,
        *,
        transport: Transport | None = None,
        swarm_key: bytes | None = None,
        config: NetConfig = DEFAULT_NET_CONFIG,
        receive_budget: ReceiveBudget | None = None,
        relay: RelayService | None = None,
    ) -> None:
        self.identity = identity
        self.handlers = handlers
        self.relay = relay
        self.transport: Transport = transport or TCPTransport()
        self.swarm_key = swarm_key
        self.config = config
        self.receive_budget = receive_budget or ReceiveBudget(config.max_receive_bytes)
        self._handshaking: dict[_Slot, None] = {}  # insertion order: oldest first
        self._channels: dict[_Slot, None] = {}
        self._per_host: Counter[str] = Counter()
        self._per_peer: Counter[PeerId] = Counter()
        self._counts: Counter[str] = Counter()

    @property
    def handshake_failures(self) -> int:
        return self._counts["handshake_failures"]

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on ``host:port`` until cancelled; reports the bound port."""
        await self.transport.serve(self.handle_stream, host, port, task_status=task_status)

    async def handle_stream(
        self, stream: trio.abc.Stream, expected_peer: PeerId | None = None
    ) -> None:
        """Handshake on an accepted stream, then serve calls until the channel closes, it is
        idle for ``idle_timeout``, or the server closes it to make room. With
        ``expected_peer`` (a connection made for one peer: a hole punch) any other `PeerId`
        is refused (`Refusal.UNEXPECTED_PEER`) once the handshake proves it."""
        host = remote_host(stream)
        if host is not None and self._per_host[host] >= self.config.max_connections_per_ip:
            self._counts["refused_per_ip"] += 1
            log.info("refused a connection from %s: per-IP connection limit", host)
            await trio.aclose_forcefully(stream)
            return
        if len(self._handshaking) >= self.config.max_handshakes:
            self._counts["evicted_handshakes"] += 1
            self._drop(self._handshake_victim())
        slot = _Slot(host)
        self._handshaking[slot] = None
        if host is not None:
            self._per_host[host] += 1
        try:
            with slot.scope:
                await self._serve_slot(stream, slot, expected_peer)
        finally:
            self._forget(slot)
            await trio.aclose_forcefully(stream)

    async def _serve_slot(
        self, stream: trio.abc.Stream, slot: _Slot, expected_peer: PeerId | None
    ) -> None:
        reader = ExactReader(stream)
        try:
            with trio.fail_after(self.config.handshake_timeout):
                hello = await read_hello(reader)
        except (SwarmError, trio.TooSlowError) as exc:
            self._counts["handshake_failures"] += 1
            log.info("inbound handshake failed: %s", exc or "no hello in time")
            return
        if self.relay is not None and expected_peer is None and self._for_relay(hello):
            self._handshaking.pop(slot, None)  # the relay's quotas apply from here
            if hello.token is not None:
                await self.relay.connect_back(stream, reader, hello.token)
            else:
                await self.relay.splice(stream, reader, hello, slot.host)
            return
        try:
            channel = await secure_inbound(
                stream,
                self.identity,
                swarm_key=self.swarm_key,
                config=self.config,
                admit=lambda peer_id: self._admit(slot, peer_id, expected_peer),
                receive_budget=self.receive_budget,
                hello=(reader, hello),
            )
        except SwarmError as exc:
            if not isinstance(exc, LimitExceeded):
                self._counts["handshake_failures"] += 1
            log.info("inbound handshake failed: %s", exc)
            return
        conn = RpcConnection(
            channel, self.handlers, self.config, remote_host=slot.host,
            via_relay=isinstance(stream, RelayedStream) and bool(stream.dialer_host),
        )  # fmt: skip
        slot.conn = conn
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._close_when_idle, conn)
            await conn.run()
            nursery.cancel_scope.cancel()

    def _for_relay(self, hello: Hello) -> bool:
        if hello.token is not None:
            return True
        target = hello.target
        assert self.relay is not None  # local invariant: checked by the caller
        return target is not None and target != self.identity.peer_id and self.relay.serves(target)

    def _admit(
        self, slot: _Slot, peer_id: PeerId, expected_peer: PeerId | None = None
    ) -> Refusal | None:
        """Called by the handshake once ``peer_id`` is proven: make room or refuse."""
        if expected_peer is not None and peer_id != expected_peer:
            self._counts["refused_unexpected"] += 1
            return Refusal.UNEXPECTED_PEER
        if not slot.live:
            return Refusal.SERVER_FULL  # evicted while its handshake was finishing
        if self._per_peer[peer_id] >= self.config.max_connections_per_peer:
            self._counts["refused_per_peer"] += 1
            return Refusal.PEER_LIMIT
        if len(self._channels) >= self.config.max_connections:
            victim = self._idle_victim()
            if victim is None:
                self._counts["refused_full"] += 1
                return Refusal.SERVER_FULL
            self._counts["evicted_idle"] += 1
            log.info("closing an idle channel (to %s) to admit %s", victim.peer_id, peer_id)
            self._drop(victim)
        del self._handshaking[slot]
        self._channels[slot] = None
        slot.peer_id = peer_id
        self._per_peer[peer_id] += 1
        return None

    def _handshake_victim(self) -> _Slot:
        """The oldest handshake of the address with the most handshakes open, so that a
        flood from one address displaces its own connections first."""
        per_host = Counter(slot.host for slot in self._handshaking)
        most = max(per_host.values())
        return next(slot for slot in self._handshaking if per_host[slot.host] == most)

    def _idle_victim(self) -> _Slot | None:
        """The channel to close for a newcomer at the global cap: among idle ones (no call
        or stream in flight, no message half received), one from the address holding the
        most channels, idle the longest; None if all are busy."""
        per_host = Counter(slot.host for slot in self._channels)
        idle = [
            (-per_host[slot.host], slot.conn.channel.last_activity, i, slot)
            for i, slot in enumerate(self._channels)
            if slot.conn is not None and not slot.conn.busy and not slot.conn.channel.receiving
        ]
        return min(idle)[3] if idle else None

    async def _close_when_idle(self, conn: RpcConnection) -> None:
        timeout = self.config.idle_timeout
        while True:
            await trio.sleep_until(conn.channel.last_activity + timeout)
            if trio.current_time() < conn.channel.last_activity + timeout:
                continue  # there was traffic while we slept
            if conn.busy:
                await trio.sleep(timeout)  # a call or stream is open; look again later
                continue
            self._counts["closed_idle"] += 1
            log.info("closing channel to %s: idle for %s s", conn.remote_peer_id, timeout)
            await conn.aclose()
            return

    def _drop(self, slot: _Slot) -> None:
        """Close a connection to make room; it leaves the tables at once."""
        self._forget(slot)
        slot.scope.cancel()

    def _forget(self, slot: _Slot) -> None:
        if not slot.live:
            return
        slot.live = False
        self._handshaking.pop(slot, None)
        self._channels.pop(slot, None)
        if slot.host is not None:
            self._per_host[slot.host] -= 1
            if not self._per_host[slot.host]:
                del self._per_host[slot.host]
        if slot.peer_id is not None:
            self._per_peer[slot.peer_id] -= 1
            if not self._per_peer[slot.peer_id]:
                del self._per_peer[slot.peer_id]

    def statistics(self) -> RpcServerStatistics:
        budget = self.receive_budget.statistics()
        c = self._counts
        return RpcServerStatistics(
            connections=len(self._channels),
            handshaking=len(self._handshaking),
            handshake_failures=c["handshake_failures"],
            refused_per_ip=c["refused_per_ip"],
            refused_per_peer=c["refused_per_peer"],
            refused_full=c["refused_full"],
            refused_unexpected=c["refused_unexpected"],
            evicted_handshakes=c["evicted_handshakes"],
            evicted_idle=c["evicted_idle"],
            closed_idle=c["closed_idle"],
            receive_budget_in_use=budget.in_use,
            receive_budget_refused=budget.refused,
        )
