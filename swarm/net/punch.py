"""Direct connections through NAT: a TCP simultaneous open coordinated over a relayed
channel, after libp2p's DCUtR (Direct Connection Upgrade through Relay).

::

    initiator D (dialed R through a relay)          relayed peer R
      bind a punch port p_D (listen + dial from it)
      ── PunchConnect [D's address] ──────────────►  bind a punch port p_R
      ◄───────────────────────── PunchConnect [R's address] ──
      RTT = time between the two                     (over the relayed, end-to-end
      ── PunchSync ────────────────────────────────►  encrypted channel)
      wait RTT / 2, then dial R from p_D             dial D from p_R at once
                 └──────── SYNs cross: one TCP connection ────────┘
      hello + Noise XX as initiator (checks R's PeerId)   R serves it as an inbound stream

Both sides listen on their punch port and dial from it (``SO_REUSEADDR`` /
``SO_REUSEPORT``), so whichever SYN gets through first makes the connection: two SYNs that
cross make a simultaneous open (one connection, RFC 793 §3.4), and a SYN that reaches the
other's listener is accepted; the one 4-tuple allows one connection either way. Behind a
NAT, the outgoing SYN opens the mapping the other side's SYN comes in through. Roles do not
depend on who connected: D runs the handshake as initiator, R answers it, and the
connection is a channel like any other (the relayed one stays until the caller drops it).

Failure (no connection within ``window``, a peer without ``hole_punch``, a refusal) leaves
the relayed channel as it was: `dial_direct` raises `ConnectError` and callers fall back.

What is exchanged: each side's interface address towards the other (D: towards the relay;
R: towards D's address), and R adds the addresses its relays see it connect from with its
punch port; R also dials D's punch port at the address its relay saw D connect from
(`RelayReady.observed`, `RelayCircuit.dialer`). Behind a NAT that keeps the source port
(endpoint-independent mapping with port preservation, common at home) those are where the
crossing SYNs arrive; a NAT that picks another port is not predicted, and D learns no
observed address of its own (R's dial at D's public address covers that side).
Who may ask, what is dialed, and when a failed peer is tried again is the policy of
`swarm.net.punch_guard`: a peer answering ``hole_punch`` dials only the caller's address as
its relay saw it, for a few punches per caller, host and address group, ``max_concurrent``
at once; the initiator makes up to ``attempts`` exchanges (DCUtR's three) and dials at most
two of the addresses named; the handshake on the direct socket checks both `PeerId`s.
On loopback SYNs cannot cross (delivery is immediate), so there one side's listener
accepts the other's dial; a true simultaneous open needs a network with delay.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

import trio

from swarm.errors import ConfigError, ConnectError, LimitExceeded, SwarmError
from swarm.identity import Identity
from swarm.net.channel import ReceiveBudget, SecureChannel
from swarm.net.config import DEFAULT_NET_CONFIG, NetConfig
from swarm.net.handshake import secure_outbound
from swarm.net.messages import PunchAddress, PunchConnect, PunchSync
from swarm.net.methods import Binding, TypedStream
from swarm.net.punch_guard import PunchAdmission, initiator_targets, punch_targets
from swarm.net.rpc import CallContext, RpcConnection
from swarm.net.surface import HOLE_PUNCH, PunchUp, open_hole_punch
from swarm.types import PeerId

__all__ = [
    "DEFAULT_PUNCH_CONFIG",
    "HolePunchService",
    "PunchConfig",
    "PunchPoint",
    "dial_direct",
    "local_address_towards",
    "with_observed",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PunchConfig:
    """How direct upgrades are tried (the initiator) and answered (the relayed peer).

    The initiator: ``attempts`` (3, as DCUtR) exchanges, each with a fresh port and round
    trip, until one connects; each tries for ``window`` (5 s) from the agreed moment, dialing
    again after ``retry`` (0.05 s) when refused, ``max_dials`` (10) times per address, at most
    ``max_targets`` (2) of the addresses the peer names; ``exchange_timeout`` (10 s) for each
    message over the relay. A caller waits ``wait`` (0.5 s) for an upgrade before it goes on over
    the relay (the punch goes on beside it). A peer whose upgrade failed is tried again after
    ``retry_after`` (300 s), doubling with each further failure up to ``max_retry_after``
    (3600 s).

    The relayed peer answers ``max_concurrent`` (4) punches at once, and per caller
    ``peer_rate`` (0.05 per second after a burst of ``peer_burst``, 6: two upgrades of three
    attempts), per caller host ``host_rate`` / ``host_burst`` (0.2, 6) and per address group
    ``group_rate`` / ``group_burst`` (1, 24), which also bounds an initiator's dials to one
    group (`swarm.net.punch_guard`)."""

    window: float = 5.0
    retry: float = 0.05
    exchange_timeout: float = 10.0
    attempts: int = 3
    wait: float = 0.5
    max_concurrent: int = 4
    retry_after: float = 300.0
    max_retry_after: float = 3600.0
    max_dials: int = 10
    max_targets: int = 2
    peer_rate: float = 0.05
    peer_burst: float = 6.0
    host_rate: float = 0.2
    host_burst: float = 6.0
    group_rate: float = 1.0
    group_burst: float = 24.0

    def __post_init__(self) -> None:
        positive = (
            "window", "retry", "exchange_timeout", "retry_after", "max_retry_after",
            "peer_rate", "host_rate", "group_rate",
        )  # fmt: skip
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"punch {name} must be positive")
        if self.wait < 0:
            raise ConfigError("punch wait must be 0 or more seconds")
        counts = ("attempts", "max_concurrent", "max_dials", "max_targets")
        bursts = ("peer_burst", "host_burst", "group_burst")
        if any(getattr(self, n) < 1 for n in (*counts, *bursts)):
            raise ConfigError(f"punch {', '.join((*counts, *bursts))} must be >= 1")

    def admission(self) -> PunchAdmission:
        """The rate limits these figures describe (one per service or pool)."""
        return PunchAdmission(
            peer_rate=self.peer_rate, peer_burst=self.peer_burst,
            host_rate=self.host_rate, host_burst=self.host_burst,
            group_rate=self.group_rate, group_burst=self.group_burst,
        )  # fmt: skip


DEFAULT_PUNCH_CONFIG = PunchConfig()
DEFAULT_PUNCH_CONFIG_DIALS = DEFAULT_PUNCH_CONFIG.max_dials


def local_address_towards(host: str) -> str:
    """The local IPv4 address the kernel would send from to reach ``host`` (no packet is
    sent: a UDP socket is only connected)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((host, 9))
            return str(probe.getsockname()[0])
        except OSError:
            return "0.0.0.0"


def _reusable(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` that other such sockets may share."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


class PunchPoint:
    """A local TCP port that listens and dials out from the same address (use ``with``).

    Raises `OSError` if ``host`` cannot be bound."""

    def __init__(self, host: str) -> None:
        listener = _reusable(host, 0)
        try:
            listener.listen(8)
        except BaseException:
            listener.close()
            raise
        self._listener = trio.socket.from_stdlib_socket(listener)
        bound = listener.getsockname()
        self.host, self.port = str(bound[0]), int(bound[1])

    @property
    def address(self) -> PunchAddress:
        return PunchAddress(host=self.host, port=self.port)

    def __enter__(self) -> PunchPoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self._listener.close()

    async def meet(
        self,
        remote: Sequence[tuple[str, int]],
        window: float,
        retry: float,
        max_dials: int = DEFAULT_PUNCH_CONFIG_DIALS,
    ) -> trio.SocketStream | None:
        """Dial every ``remote`` address from this port (again after ``retry`` when
        refused, ``max_dials`` times at most) while accepting on it, for up to ``window``
        seconds: the first connection made either way, or None. Later ones are closed."""
        got: list[trio.SocketStream] = []

        async with trio.open_nursery() as nursery:

            def take(stream: trio.SocketStream) -> None:
                got.append(stream)
                nursery.cancel_scope.cancel()

            async def accept() -> None:
                sock, _ = await self._listener.accept()
                take(trio.SocketStream(sock))

            async def dial(address: tuple[str, int]) -> None:
                for _ in range(max_dials):
                    try:
                        sock = trio.socket.from_stdlib_socket(_reusable(self.host, self.port))
                    except OSError as exc:
                        log.debug("punch port %s: %s", self.port, exc)
                        await trio.sleep(retry)
                        continue
                    try:
                        await sock.connect(address)
                    except OSError as exc:  # refused, or the 4-tuple is taken by an accept
                        sock.close()
                        log.debug("punch dial to %s:%s: %s", *address, exc)
                        await trio.sleep(retry)
                        continue
                    except BaseException:
                        sock.close()
                        raise
                    take(trio.SocketStream(sock))
                    return

            nursery.start_soon(accept)
            for address in remote:
                nursery.start_soon(dial, address)
            await trio.sleep(window)
            nursery.cancel_scope.cancel()
        for extra in got[1:]:
            await trio.aclose_forcefully(extra)
        return got[0] if got else None


def _addresses(msg: PunchConnect) -> list[tuple[str, int]]:
    return [(a.host, a.port) for a in msg.addresses]


def _is_ipv4(host: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv4Address)
    except ValueError:
        return False


def with_observed(
    addresses: Sequence[tuple[str, int]], observed: Iterable[str], limit: int = 4
) -> list[tuple[str, int]]:
    """``addresses`` and, for each of their ports, each ``observed`` IPv4 host (as a relay
    saw that side connect: where a NAT that keeps the port forwards it), distinct, the
    given ones first, at most ``limit``."""
    out = list(dict.fromkeys(addresses))
    for host in dict.fromkeys(h for h in observed if _is_ipv4(h)):
        for port in dict.fromkeys(p for _h, p in addresses):
            if (host, port) not in out:
                out.append((host, port))
    return out[:limit]


async def dial_direct(
    conn: RpcConnection,
    identity: Identity,
    expected_peer: PeerId,
    *,
    towards: str,
    swarm_key: bytes | None = None,
    config: NetConfig = DEFAULT_NET_CONFIG,
    punch: PunchConfig = DEFAULT_PUNCH_CONFIG,
    receive_budget: ReceiveBudget | None = None,
    admission: PunchAdmission | None = None,
) -> SecureChannel:
    """The initiator's side: over ``conn`` (a relayed channel to ``expected_peer``), agree
    on a moment with the peer, connect to it directly, and run the handshake as the
    initiator (the peer must prove ``expected_peer`` again). ``towards``: the host the
    relayed channel was dialed at (the relay), whose interface our punch port binds to.
    Up to ``punch.attempts`` exchanges (DCUtR's retries, each with a fresh round trip);
    of the addresses the peer names we dial `initiator_targets`, each within
    ``admission``'s per-address-group budget when one is given.

    Raises `ConnectError` when no direct connection is made (the caller keeps ``conn``),
    `RemoteError` (`LimitExceeded`) when the peer refuses, and what `secure_outbound`
    raises (`PeerIdMismatch` when someone else answers on the direct socket).
    """
    direct = None
    for attempt in range(1, punch.attempts + 1):
        direct, rtt = await _attempt(conn, towards, punch, admission)
        if direct is not None:
            break
        log.info("no direct connection to %s (attempt %d)", expected_peer, attempt)
    if direct is None:
        raise ConnectError(f"no direct connection to {expected_peer} in {punch.attempts} attempts")
    log.info("direct connection to %s (relay round trip %.1f ms)", expected_peer, rtt * 1e3)
    try:
        return await secure_outbound(
            direct, identity, expected_peer=expected_peer, swarm_key=swarm_key, config=config,
            receive_budget=receive_budget,
        )  # fmt: skip
    except BaseException:
        await trio.aclose_forcefully(direct)
        raise


async def _attempt(
    conn: RpcConnection, towards: str, punch: PunchConfig, admission: PunchAdmission | None
) -> tuple[trio.SocketStream | None, float]:
    """One exchange and simultaneous open: the direct socket (or None) and the round trip."""
    with PunchPoint(local_address_towards(towards)) as point:
        started = trio.current_time()
        try:
            async with open_hole_punch(conn, timeout=punch.exchange_timeout) as stream:
                await stream.send(PunchConnect(addresses=(point.address,)))
                theirs = await stream.receive(PunchConnect)
                rtt = trio.current_time() - started
                await stream.send(PunchSync())
                await stream.send_end()
                await trio.sleep(rtt / 2)  # the peer dials when the sync arrives
                named = initiator_targets(_addresses(theirs), point.host, punch.max_targets)
                remote = [a for a in named if admission is None or admission.may_dial(a[0])]
                direct = await point.meet(remote, punch.window, punch.retry, punch.max_dials)
        except trio.EndOfChannel:
            raise ConnectError("the peer ended the hole punch") from None
    return direct, rtt


class HolePunchService:
    """The relayed peer's side of ``hole_punch``: on a caller's `PunchConnect`, bind a
    punch port, answer with its address, and dial the caller when its `PunchSync` comes;
    a connection made is served by ``serve_inbound`` (the peer's `RpcServer.handle_stream`,
    which runs the handshake as for any inbound stream and refuses any `PeerId` but the
    caller's) inside `run`'s nursery, so it outlives the call. Start `run` before serving
    `binding`.

    Answered only over a relayed channel whose relay named the caller's address, which is
    the only address dialed (`punch_targets`); rationed per caller, host and address group
    (`PunchAdmission`) and ``max_concurrent`` at once: refusals are `LimitExceeded`."""

    def __init__(
        self,
        serve_inbound: Callable[[trio.abc.Stream, PeerId], Awaitable[None]],
        config: PunchConfig = DEFAULT_PUNCH_CONFIG,
        observed_hosts: Callable[[], Iterable[str]] = tuple,
    ) -> None:
        self._serve_inbound = serve_inbound
        self._observed_hosts = observed_hosts
        self.config = config
        self._limit = trio.Semaphore(config.max_concurrent)
        self._admission = config.admission()
        self._nursery: trio.Nursery | None = None
        self.upgraded = 0  # direct connections handed to serve_inbound
        self.refused = 0  # punches refused by the limits or for want of a relayed caller

    def binding(self) -> Binding:
        return HOLE_PUNCH.bind(self.rpc_hole_punch)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the direct connections' tasks until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def _check(self, ctx: CallContext) -> str:
        """The caller's host as its relay saw it; raises `LimitExceeded` to refuse."""
        if self._nursery is None:
            raise LimitExceeded("hole punching is not running")
        host = ctx.peer_host
        if not ctx.via_relay or not host:
            self.refused += 1
            raise LimitExceeded("hole punching is only for callers that came through a relay")
        refusal = self._admission.admit(ctx.peer_id, host)
        if refusal is not None:
            self.refused += 1
            raise LimitExceeded(refusal)
        try:
            self._limit.acquire_nowait()
        except trio.WouldBlock:
            self.refused += 1
            raise LimitExceeded("too many hole punches at once") from None
        return host

    async def rpc_hole_punch(
        self, stream: TypedStream[PunchConnect, PunchUp], ctx: CallContext
    ) -> None:
        host = self._check(ctx)
        try:
            timeout = self.config.exchange_timeout
            theirs = await stream.receive(PunchConnect, timeout=timeout)
            ours = tuple(self._observed_hosts())
            remote = punch_targets(_addresses(theirs), host, ours, self.config.max_targets)
            if not remote:
                log.info("hole punch from %s names no address we dial", ctx.peer_id)
                return
            with PunchPoint(local_address_towards(remote[0][0])) as point:
                mine = with_observed([(point.host, point.port)], ours)
                await stream.send(
                    PunchConnect(addresses=tuple(PunchAddress(host=h, port=p) for h, p in mine))
                )
                await stream.receive(PunchSync, timeout=timeout)
                config = self.config
                direct = await point.meet(remote, config.window, config.retry, config.max_dials)
            if direct is None:
                log.info("no direct connection from %s within the window", ctx.peer_id)
                return
            assert self._nursery is not None  # local invariant: `_check` saw it
            self.upgraded += 1
            self._nursery.start_soon(self._serve, direct, ctx.peer_id)
        except (OSError, SwarmError, trio.EndOfChannel) as exc:
            log.info("hole punch with %s failed: %s", ctx.peer_id, exc)
        finally:
            self._limit.release()

    async def _serve(self, stream: trio.SocketStream, peer: PeerId) -> None:
        async with stream:
            await self._serve_inbound(stream, peer)
