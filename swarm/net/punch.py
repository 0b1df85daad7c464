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
A peer answering ``hole_punch`` dials only addresses
it would dial back (`may_punch`), each ``max_dials`` times at most, for a few punches per
caller host (``host_rate``) and ``max_concurrent`` at once: a TCP connect, no byte sent.
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
from swarm.net.dialback import is_local_host, may_dial_back
from swarm.net.handshake import secure_outbound
from swarm.net.messages import PunchAddress, PunchConnect, PunchSync
from swarm.net.methods import Binding, TypedStream
from swarm.net.quota import TokenBuckets
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
    "may_punch",
    "with_observed",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PunchConfig:
    """``window`` (5 s): how long both sides try to connect from the agreed moment;
    ``retry`` (0.05 s) between dials refused within it; ``exchange_timeout`` (10 s) for
    each message of the exchange over the relay; ``max_concurrent`` (4) punches a relayed
    peer answers at once (more are refused: each costs it a port and dials);
    ``retry_after`` (300 s): a dialer whose punch to a peer failed does not try that peer
    again sooner; ``max_dials`` (10) connects per address and punch (refused ones are
    retried); ``host_rate`` (0.2 per second, after a burst of ``host_burst``, 4): punches a
    relayed peer answers per caller host."""

    window: float = 5.0
    retry: float = 0.05
    exchange_timeout: float = 10.0
    max_concurrent: int = 4
    retry_after: float = 300.0
    max_dials: int = 10
    host_rate: float = 0.2
    host_burst: float = 4.0

    def __post_init__(self) -> None:
        for name in ("window", "retry", "exchange_timeout", "retry_after", "host_rate"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"punch {name} must be positive")
        if self.max_concurrent < 1 or self.max_dials < 1 or self.host_burst < 1:
            raise ConfigError("punch max_concurrent, max_dials and host_burst must be >= 1")


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


def may_punch(target: str, caller_host: str | None, ours: Iterable[str]) -> bool:
    """Whether a relayed peer dials ``target`` for a caller seen at ``caller_host`` (a
    `host_key`): what it would dial back (`may_dial_back`: the caller's own host, or a
    private address for a caller on one), or a private address when the caller comes
    from one of our own observed addresses (``ours``: behind the same NAT)."""
    if may_dial_back(target, caller_host):
        return True
    return caller_host in set(ours) and is_local_host(target)


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
) -> SecureChannel:
    """The initiator's side: over ``conn`` (a relayed channel to ``expected_peer``), agree
    on a moment with the peer, connect to it directly, and run the handshake as the
    initiator (the peer must prove ``expected_peer`` again). ``towards``: the host the
    relayed channel was dialed at (the relay), whose interface our punch port binds to.

    Raises `ConnectError` when no direct connection is made (the caller keeps ``conn``),
    `RemoteError` when the peer refuses, and what `secure_outbound` raises.
    """
    with PunchPoint(local_address_towards(towards)) as point:
        started = trio.current_time()
        timeout = punch.exchange_timeout
        try:
            async with open_hole_punch(conn, timeout=timeout) as stream:
                await stream.send(PunchConnect(addresses=(point.address,)))
                theirs = await stream.receive(PunchConnect)
                rtt = trio.current_time() - started
                await stream.send(PunchSync())
                await stream.send_end()
                await trio.sleep(rtt / 2)  # the peer dials when the sync arrives
                remote = _addresses(theirs)
                direct = await point.meet(remote, punch.window, punch.retry, punch.max_dials)
        except trio.EndOfChannel:
            raise ConnectError("the peer ended the hole punch") from None
    if direct is None:
        raise ConnectError(f"no direct connection to {expected_peer} within {punch.window} s")
    log.info("direct connection to %s (relay round trip %.1f ms)", expected_peer, rtt * 1e3)
    return await secure_outbound(
        direct, identity, expected_peer=expected_peer, swarm_key=swarm_key, config=config,
        receive_budget=receive_budget,
    )  # fmt: skip


class HolePunchService:
    """The relayed peer's side of ``hole_punch``: on a caller's `PunchConnect`, bind a
    punch port, answer with its address, and dial the caller when its `PunchSync` comes;
    a connection made is served by ``serve_inbound`` (the peer's `RpcServer.handle_stream`,
    which runs the handshake as for any inbound stream) inside `run`'s nursery, so it
    outlives the call. Start `run` before serving `binding`."""

    def __init__(
        self,
        serve_inbound: Callable[[trio.abc.Stream], Awaitable[None]],
        config: PunchConfig = DEFAULT_PUNCH_CONFIG,
        observed_hosts: Callable[[], Iterable[str]] = tuple,
    ) -> None:
        self._serve_inbound = serve_inbound
        self._observed_hosts = observed_hosts
        self.config = config
        self._limit = trio.Semaphore(config.max_concurrent)
        self._per_host = TokenBuckets(config.host_rate, config.host_burst)
        self._nursery: trio.Nursery | None = None
        self.upgraded = 0  # direct connections handed to serve_inbound

    def binding(self) -> Binding:
        return HOLE_PUNCH.bind(self.rpc_hole_punch)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the direct connections' tasks until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def rpc_hole_punch(
        self, stream: TypedStream[PunchConnect, PunchUp], ctx: CallContext
    ) -> None:
        if self._nursery is None:
            raise LimitExceeded("hole punching is not running")
        if not self._per_host.try_take(ctx.peer_host or "?", 1.0):
            raise LimitExceeded("too many hole punches from this host")
        try:
            self._limit.acquire_nowait()
        except trio.WouldBlock:
            raise LimitExceeded("too many hole punches at once") from None
        try:
            timeout = self.config.exchange_timeout
            theirs = await stream.receive(PunchConnect, timeout=timeout)
            ours = tuple(self._observed_hosts())
            given = [a for a in _addresses(theirs) if may_punch(a[0], ctx.peer_host, ours)]
            if not given:
                log.info("hole punch from %s names no address we dial", ctx.peer_id)
                return
            # also where the relay saw the caller (its NAT's address, if it keeps the port)
            remote = with_observed(given, [ctx.peer_host or ""])
            with PunchPoint(local_address_towards(given[0][0])) as point:
                mine = with_observed([(point.host, point.port)], self._observed_hosts())
                await stream.send(
                    PunchConnect(addresses=tuple(PunchAddress(host=h, port=p) for h, p in mine))
                )
                await stream.receive(PunchSync, timeout=timeout)
                config = self.config
                direct = await point.meet(remote, config.window, config.retry, config.max_dials)
            if direct is None:
                log.info("no direct connection from %s within the window", ctx.peer_id)
                return
            self.upgraded += 1
            self._nursery.start_soon(self._serve, direct)
        except (OSError, SwarmError, trio.EndOfChannel) as exc:
            log.info("hole punch with %s failed: %s", ctx.peer_id, exc)
        finally:
            self._limit.release()

    async def _serve(self, stream: trio.SocketStream) -> None:
        async with stream:
            await self._serve_inbound(stream)
