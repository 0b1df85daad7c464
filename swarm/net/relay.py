"""Relays: a reachable peer splices dialers onto peers that cannot be dialed.

::

    dialer D ──TCP──► relay X ◄──TCP (outbound, "connect-back")── relayed server R
          routed hello names R ─► X offers a token on R's reservation stream ─► R dials X
          with the token ─► X forwards D's hello and every later byte both ways, unchanged

A relayed server R keeps a ``relay_reserve`` stream open to X over an ordinary channel
(`hold_reservation`). A dialer D that wants R dials X exactly as it would dial R: its hello
is routed (it names R's `PeerId`, `swarm.net.handshake`), so X's listener hands the stream to
`RelayService.splice` instead of answering itself. X sends R a one-time token on the
reservation stream; R opens a fresh outbound connection to X that starts with a
connect-back hello carrying the token, and treats it as an inbound connection. X then
joins the two streams. The Noise handshake runs between D and R through the splice, its
prologue covering the routed hello: X sees only ciphertext, a changed byte fails
authentication, and X cannot answer as R (D checks R's `PeerId`). A relay in a private
swarm splices only dialers whose routed hello carries the swarm key's HMAC of the target,
and takes reservations only over its own (swarm-key) channels.

Quotas (`RelayLimits`): reservations in all; circuits in all, per relayed peer and per
dialer address (open at once, and new ones per second); bytes per second per dialer
address and per relayed peer (a circuit over its rate is slowed down, and while the
address or peer is in debt new circuits are refused); a circuit idle for
``idle_timeout`` is closed. A refusal reaches the dialer as `LimitExceeded`
(``limit_exceeded``).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from swarm.errors import (
    ConfigError,
    ConnectionClosed,
    LimitExceeded,
    SwarmError,
    unwrap_group,
)
from swarm.identity import Identity
from swarm.net.channel import ExactReader
from swarm.net.hello import TOKEN_LEN, Hello, RelayRefusal, connect_back_hello, refuse_hello
from swarm.net.messages import RelayCircuit, RelayReady, RelayReserve
from swarm.net.methods import Binding, TypedStream
from swarm.net.quota import TokenBuckets
from swarm.net.rpc import CallContext, RpcConnection
from swarm.net.surface import RELAY_RESERVE, RelayDown, open_relay_reserve
from swarm.net.transport import RelayedStream, Transport
from swarm.types import PeerId

__all__ = [
    "RelayLimits",
    "RelayService",
    "RelayStatistics",
    "hold_reservation",
]

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024
MiB = 1024 * 1024


@dataclass(frozen=True)
class RelayLimits:
    """A relay's quotas (defaults in parentheses).

    ``max_reservations`` (64) relayed peers; ``max_circuits`` (512) circuits open in all;
    ``circuits_per_peer`` (64) open to one relayed peer; ``circuits_per_dialer`` (16) open
    from one dialer address, which also may open ``circuit_rate`` (2) new circuits per
    second after a burst of ``circuits_per_dialer``; ``bytes_per_second`` (16 MiB) per
    dialer address and ``peer_bytes_per_second`` (64 MiB) per relayed peer, both
    directions together, after a burst of ``burst_bytes`` (64 MiB); ``idle_timeout``
    (120 s) without a byte closes a circuit;
    ``connect_back_timeout`` (5 s) for the relayed peer to connect back; ``heartbeat``
    (10 s) between messages on a reservation stream.
    """

    max_reservations: int = 64
    max_circuits: int = 512
    circuits_per_peer: int = 64
    circuits_per_dialer: int = 16
    circuit_rate: float = 2.0
    bytes_per_second: float = 16 * MiB
    peer_bytes_per_second: float = 64 * MiB
    burst_bytes: float = 64 * MiB
    idle_timeout: float = 120.0
    connect_back_timeout: float = 5.0
    heartbeat: float = 10.0

    def __post_init__(self) -> None:
        for name in ("max_reservations", "max_circuits", "circuits_per_peer"):
            if getattr(self, name) < 1:
                raise ConfigError(f"relay {name} must be at least 1")
        if self.circuits_per_dialer < 1:
            raise ConfigError("relay circuits_per_dialer must be at least 1")
        for name in (
            "circuit_rate",
            "bytes_per_second",
            "peer_bytes_per_second",
            "burst_bytes",
            "idle_timeout",
        ):
            if not getattr(self, name) > 0:
                raise ConfigError(f"relay {name} must be positive")
        if not 0.1 <= self.heartbeat <= 3600:
            raise ConfigError("relay heartbeat must be within 0.1..3600 s")


@dataclass(frozen=True)
class RelayStatistics:
    reservations: int  # relayed peers now
    circuits: int  # open now
    circuits_total: int  # spliced since start
    refused: int  # routed dials refused (quotas, unavailable peers, non-members)
    bytes_relayed: int


class _Reservation:
    def __init__(self, peer_id: PeerId) -> None:
        self.peer_id = peer_id
        # (token, the dialer's address) of each circuit waiting for a connect-back
        self.offers_send, self.offers = trio.open_memory_channel[tuple[bytes, str]](16)
        self.scope = trio.CancelScope()


class _Pending:
    def __init__(self) -> None:
        self.arrived = trio.Event()
        self.done = trio.Event()
        self.stream: trio.abc.Stream | None = None
        self.reader: ExactReader | None = None


class RelayService:
    """The relay's side: reservations (``rpc_relay_reserve``) and splicing.

    ``RpcServer(..., relay=service)`` hands it the streams whose hello asks for a peer it
    relays (`serves`) and every connect-back; `binding` (``relay_reserve``) must be in the
    same server's registry. ``swarm_key``: the private swarm it relays for (None: open).
    """

    def __init__(
        self,
        identity: Identity,
        *,
        swarm_key: bytes | None = None,
        limits: RelayLimits | None = None,
    ) -> None:
        self.identity = identity
        self.swarm_key = swarm_key
        self.limits = limits = limits or RelayLimits()
        self._reservations: dict[PeerId, _Reservation] = {}
        self._pending: dict[bytes, _Pending] = {}
        self._per_peer: Counter[PeerId] = Counter()
        self._per_dialer: Counter[str] = Counter()
        self._dialer_rate = TokenBuckets(limits.circuit_rate, limits.circuits_per_dialer)
        self._dialer_bytes = TokenBuckets(limits.bytes_per_second, limits.burst_bytes)
        self._peer_bytes = TokenBuckets(limits.peer_bytes_per_second, limits.burst_bytes)
        self._circuits = 0
        self._circuits_total = 0
        self._refused = 0
        self._bytes_relayed = 0

    def serves(self, peer_id: PeerId) -> bool:
        """Whether ``peer_id`` holds a reservation here."""
        return peer_id in self._reservations

    def statistics(self) -> RelayStatistics:
        return RelayStatistics(
            reservations=len(self._reservations),
            circuits=self._circuits,
            circuits_total=self._circuits_total,
            refused=self._refused,
            bytes_relayed=self._bytes_relayed,
        )

    # ---- reservations ----

    def binding(self) -> Binding:
        """``relay_reserve`` as a registry serves it."""
        return RELAY_RESERVE.bind(self.rpc_relay_reserve)

    async def rpc_relay_reserve(
        self, stream: TypedStream[RelayDown, RelayReserve], ctx: CallContext
    ) -> None:
        """Hold a reservation for the caller until the stream ends: offer it the tokens of
        circuits dialers ask for, and a heartbeat in between."""
        await stream.receive(RelayReserve, timeout=self.limits.heartbeat)
        peer = ctx.peer_id
        old = self._reservations.get(peer)
        if old is None and len(self._reservations) >= self.limits.max_reservations:
            raise LimitExceeded("the relay holds its maximum of reservations")
        if old is not None:
            old.scope.cancel()  # the peer reconnected: its new stream replaces the old
        reservation = _Reservation(peer)
        self._reservations[peer] = reservation
        log.info("relaying for %s", peer)
        try:
            with reservation.scope:
                ready = RelayReady(heartbeat=self.limits.heartbeat, observed=ctx.peer_host or "")
                await stream.send(ready)
                while True:
                    offer = None
                    with trio.move_on_after(self.limits.heartbeat):
                        offer = await reservation.offers.receive()
                    if offer is None:
                        await stream.send(ready)
                    else:
                        await stream.send(RelayCircuit(token=offer[0], dialer=offer[1]))
        finally:
            if self._reservations.get(peer) is reservation:
                del self._reservations[peer]
                log.info("no longer relaying for %s", peer)

    # ---- circuits ----

    def _refusal(self, dialer: str, target: PeerId) -> RelayRefusal | None:
        lim = self.limits
        if (
            self._circuits >= lim.max_circuits
            or self._per_peer[target] >= lim.circuits_per_peer
            or self._per_dialer[dialer] >= lim.circuits_per_dialer
            or self._dialer_bytes.in_debt(dialer)
            or self._peer_bytes.in_debt(target)
            or not self._dialer_rate.try_take(dialer, 1.0)
        ):
            return RelayRefusal.LIMIT
        return None

    async def splice(
        self, stream: trio.abc.Stream, reader: ExactReader, hello: Hello, dialer: str | None
    ) -> None:
        """Join a dialer's stream (whose routed ``hello`` was read through ``reader``) to the
        relayed peer's connect-back, or answer with a refusal. Returns when the circuit
        ends; the caller closes ``stream``."""
        target = hello.target
        assert target is not None  # local invariant: RpcServer routes only routed hellos
        who = dialer or "?"
        refusal = self._refusal(who, target)
        if refusal is None and not hello.route_mac_ok(self.swarm_key):
            refusal = RelayRefusal.NOT_MEMBER
        reservation = self._reservations.get(target)
        if refusal is None and reservation is None:
            refusal = RelayRefusal.UNAVAILABLE
        if refusal is not None or reservation is None:
            await self._refuse(stream, refusal or RelayRefusal.UNAVAILABLE, who, target)
            return
        self._circuits += 1
        self._per_peer[target] += 1
        self._per_dialer[who] += 1
        try:
            await self._connect(stream, reader, hello, who, reservation)
        finally:
            self._circuits -= 1
            self._per_peer[target] -= 1
            self._per_dialer[who] -= 1
            for counter, key in ((self._per_peer, target), (self._per_dialer, who)):
                if not counter[key]:  # type: ignore[index]
                    del counter[key]  # type: ignore[attr-defined]

    async def _refuse(
        self, stream: trio.abc.Stream, reason: RelayRefusal, who: str, target: PeerId
    ) -> None:
        self._refused += 1
        log.info("relay refused a circuit from %s to %s: %s", who, target, reason.name)
        with trio.move_on_after(1.0), _quiet():
            await stream.send_all(refuse_hello(reason))

    async def _connect(
        self,
        stream: trio.abc.Stream,
        reader: ExactReader,
        hello: Hello,
        who: str,
        reservation: _Reservation,
    ) -> None:
        token = os.urandom(TOKEN_LEN)
        pending = _Pending()
        self._pending[token] = pending
        try:
            try:
                reservation.offers_send.send_nowait((token, "" if who == "?" else who))
            except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                await self._refuse(stream, RelayRefusal.UNAVAILABLE, who, reservation.peer_id)
                return
            with trio.move_on_after(self.limits.connect_back_timeout):
                await pending.arrived.wait()
            if pending.stream is None or pending.reader is None:
                await self._refuse(stream, RelayRefusal.UNAVAILABLE, who, reservation.peer_id)
                return
            self._circuits_total += 1
            first = hello.raw + reader.take_buffered()
            await self._pump_both(
                (stream, pending.stream),
                (first, pending.reader.take_buffered()),
                who,
                reservation.peer_id,
            )
        finally:
            self._pending.pop(token, None)
            pending.done.set()

    async def connect_back(
        self, stream: trio.abc.Stream, reader: ExactReader, token: bytes
    ) -> None:
        """A relayed peer's connect-back for the circuit of ``token``: lend the stream to
        the waiting dialer until the circuit ends (an unknown token just closes it)."""
        pending = self._pending.pop(token, None)
        if pending is None or pending.arrived.is_set():
            return
        pending.stream, pending.reader = stream, reader
        pending.arrived.set()
        await pending.done.wait()

    async def _pump_both(
        self,
        streams: tuple[trio.abc.Stream, trio.abc.Stream],
        first: tuple[bytes, bytes],
        who: str,
        peer: PeerId,
    ) -> None:
        dialer, relayed = streams
        last = [trio.current_time()]
        async with trio.open_nursery() as nursery:

            async def pump(src: trio.abc.Stream, dst: trio.abc.Stream, head: bytes) -> None:
                with _quiet():
                    data: bytes | bytearray = head
                    while True:
                        if data:
                            await self._throttle(who, peer, len(data))
                            await dst.send_all(data)
                            self._bytes_relayed += len(data)
                            last[0] = trio.current_time()
                        data = await src.receive_some(_CHUNK)
                        if not data:
                            break
                nursery.cancel_scope.cancel()  # one side ended: the circuit ends

            async def watch_idle() -> None:
                idle = self.limits.idle_timeout
                while trio.current_time() < last[0] + idle:
                    await trio.sleep_until(last[0] + idle)
                log.info("closing an idle relay circuit")
                nursery.cancel_scope.cancel()

            nursery.start_soon(pump, dialer, relayed, first[0])
            nursery.start_soon(pump, relayed, dialer, first[1])
            nursery.start_soon(watch_idle)

    async def _throttle(self, who: str, peer: PeerId, n: int) -> None:
        wait = max(self._dialer_bytes.charge(who, n), self._peer_bytes.charge(peer, n))
        if wait > 0:
            await trio.sleep(wait)


class _quiet:
    """Treat a closed or broken stream as the end of the circuit."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> bool:
        return kind is not None and issubclass(
            kind, trio.BrokenResourceError | trio.ClosedResourceError
        )


async def hold_reservation(
    conn: RpcConnection,
    transport: Transport,
    host: str,
    port: int,
    serve_inbound: Callable[[trio.abc.Stream], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The relayed peer's side: reserve at the relay on ``conn`` (at ``host:port``), report
    started once the relay accepted (with the address the relay sees us at, "" when it
    does not say), then connect back for every circuit offered and hand each such stream
    to ``serve_inbound`` (the peer's own `RpcServer.handle_stream`) as a `RelayedStream`
    naming the dialer's address as the relay saw it.

    Returns never; raises `ConnectionClosed` / `DeadlineExceeded` (no message for three
    heartbeats) / `RemoteError` when the reservation is lost.
    """
    try:
        async with open_relay_reserve(conn) as stream:
            await stream.send(RelayReserve())
            ready = await stream.receive(RelayReady)
            within = 3 * ready.heartbeat  # a relay silent this long is gone
            task_status.started(ready.observed)
            async with trio.open_nursery() as nursery:
                while True:
                    msg = await stream.receive_any(timeout=within)
                    if isinstance(msg, RelayCircuit):
                        nursery.start_soon(_connect_back, transport, host, port, msg, serve_inbound)
    except trio.EndOfChannel:
        raise ConnectionClosed("the relay ended the reservation") from None
    except BaseExceptionGroup as group:
        inner = unwrap_group(group)
        if isinstance(inner, trio.EndOfChannel):
            raise ConnectionClosed("the relay ended the reservation") from None
        raise inner from None


async def _connect_back(
    transport: Transport,
    host: str,
    port: int,
    circuit: RelayCircuit,
    serve_inbound: Callable[[trio.abc.Stream], Awaitable[None]],
) -> None:
    try:
        stream = await transport.connect(host, port)
    except SwarmError as exc:
        log.info("cannot connect back to relay %s:%s: %s", host, port, exc)
        return
    async with stream:
        with _quiet():
            await stream.send_all(connect_back_hello(circuit.token))
            await serve_inbound(RelayedStream(stream, circuit.dialer))
