"""Direct connections by TCP simultaneous open, coordinated over a relayed channel
(`swarm.net.punch`), on loopback. Loopback has no NAT: what is shown is the coordination
(the exchange over the relay, both sides dialing from a port they also listen on, one
connection whichever SYN lands first), the handshake over the direct socket, and the
fallback; not that a real NAT lets the crossing SYNs through."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import torch
import trio

from swarm.errors import ConnectError, LimitExceeded, PeerIdMismatch, RemoteError
from swarm.identity import Identity
from swarm.net.handshake import open_channel
from swarm.net.messages import (
    ForwardRequest,
    ForwardResponse,
    PunchAddress,
    PunchConnect,
    PunchSync,
)
from swarm.net.methods import HandlerRegistry
from swarm.net.pool import open_connection_pool
from swarm.net.punch import (
    HolePunchService,
    PunchConfig,
    PunchPoint,
    dial_direct,
    with_observed,
)
from swarm.net.punch_guard import PunchAdmission, PunchBackoff, initiator_targets, punch_targets
from swarm.net.relay import RelayService, hold_reservation
from swarm.net.rpc import CallContext, RpcConnection
from swarm.net.rpc_server import RpcServer
from swarm.net.surface import FORWARD, call_forward, open_hole_punch
from swarm.net.transport import TCPTransport
from swarm.testing.reach import NeverPunches
from swarm.types import LayerRange

from .conftest import ALICE, BOB

RELAY = Identity.from_seed(b"punch-relay")
RELAYED = Identity.from_seed(b"punch-relayed")
QUICK = PunchConfig(window=2.0, exchange_timeout=5.0)


async def test_two_peers_dialing_each_other_at_the_agreed_moment_get_one_channel() -> None:
    async def meet(
        got: dict[str, trio.SocketStream | None],
        name: str, me: PunchPoint, other: PunchPoint, delay: float,
    ) -> None:  # fmt: skip
        await trio.sleep(delay)
        got[name] = await me.meet([(other.host, other.port)], window=2.0, retry=0.01)

    for stagger in (0.0, 0.02):  # both at once, and one a little after the other
        with trio.fail_after(10), PunchPoint("127.0.0.1") as a, PunchPoint("127.0.0.1") as b:
            got: dict[str, trio.SocketStream | None] = {}

            async with trio.open_nursery() as nursery:
                nursery.start_soon(meet, got, "a", a, b, 0.0)
                nursery.start_soon(meet, got, "b", b, a, stagger)
            sa, sb = got["a"], got["b"]
            assert sa is not None and sb is not None
            # the two ends of one TCP connection, between the two punch ports
            assert sa.socket.getsockname() == sb.socket.getpeername() == ("127.0.0.1", a.port)
            assert sb.socket.getsockname() == sa.socket.getpeername() == ("127.0.0.1", b.port)
            await sa.send_all(b"from a")
            assert await sb.receive_some(64) == b"from a"
            await sb.send_all(b"from b")
            assert await sa.receive_some(64) == b"from b"
            await sa.aclose()
            await sb.aclose()


async def test_nobody_at_the_other_end_gives_none_within_the_window() -> None:
    with trio.fail_after(10), PunchPoint("127.0.0.1") as a:
        with PunchPoint("127.0.0.1") as gone:
            address = (gone.host, gone.port)
        assert await a.meet([address], window=0.2, retry=0.01) is None


class Echo:
    def __init__(self) -> None:
        self.calls = 0

    async def rpc_forward(self, request: ForwardRequest, ctx: CallContext) -> ForwardResponse:
        self.calls += 1
        return ForwardResponse(hidden_states=request.hidden_states)


@dataclass
class Setup:
    port: int  # the relay's
    relay: RelayService
    echo: Echo
    punch: HolePunchService | None


@asynccontextmanager
async def relayed_peer(
    *, offer_punch: bool = True, config: PunchConfig = QUICK, never: NeverPunches | None = None
) -> AsyncIterator[Setup]:
    """A relay on 127.0.0.1 and a peer listening nowhere, reserved there, that offers
    ``hole_punch`` (or not; ``never``: one that never connects)."""
    relay = RelayService(RELAY)
    relay_rpc = RpcServer(RELAY, HandlerRegistry([relay.binding()]), relay=relay)
    echo = Echo()
    bindings = [FORWARD.bind(echo.rpc_forward)]
    registry = HandlerRegistry(bindings)
    relayed_rpc = RpcServer(RELAYED, registry)
    punch = HolePunchService(relayed_rpc.handle_stream, config) if offer_punch else None
    if punch is not None:
        relayed_rpc.handlers = registry.with_bindings([punch.binding()])
    if never is not None:
        relayed_rpc.handlers = never.binding_for(relayed_rpc.handlers)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            if punch is not None:
                await nursery.start(punch.run)
            port = await nursery.start(relay_rpc.serve, "127.0.0.1", 0)
            async with open_connection_pool(RELAYED) as pool:
                conn = await pool.get("127.0.0.1", port, RELAY.peer_id)
                await nursery.start(
                    hold_reservation, conn, TCPTransport(), "127.0.0.1", port,
                    relayed_rpc.handle_stream,
                )  # fmt: skip
                yield Setup(port, relay, echo, punch)
                nursery.cancel_scope.cancel()


def payload(n: int) -> ForwardRequest:
    ids = torch.arange(n, dtype=torch.int64).reshape(1, -1, 1)
    return ForwardRequest(
        hidden_states=ids, positions=torch.zeros(1, n, dtype=torch.int64),
        layer_range=LayerRange(0, 1),
    )  # fmt: skip


async def _forward(conn: RpcConnection) -> None:
    answer = await call_forward(conn, payload(64), timeout=10.0)
    assert answer.hidden_states.flatten().tolist() == list(range(64))


async def test_a_relayed_channel_is_upgraded_to_a_direct_one() -> None:
    async with relayed_peer() as setup, open_connection_pool(ALICE) as pool:
        relayed = await pool.get("127.0.0.1", setup.port, RELAYED.peer_id)
        await _forward(relayed)  # through the relay
        assert not pool.is_direct(RELAYED.peer_id)
        assert await pool.upgrade(RELAYED.peer_id, towards="127.0.0.1", punch=QUICK)
        direct = await pool.get("127.0.0.1", setup.port, RELAYED.peer_id)
        assert direct is not relayed and pool.is_direct(RELAYED.peer_id)
        assert direct.channel.remote_peer_id == RELAYED.peer_id  # the handshake proved it again
        assert setup.punch is not None and setup.punch.upgraded == 1
        before = setup.relay.statistics().bytes_relayed
        await _forward(direct)
        assert setup.relay.statistics().bytes_relayed == before  # not a byte via the relay
        assert setup.echo.calls == 2
        with trio.fail_after(10):  # the relayed channel, idle, is closed: its circuit ends
            while not relayed.is_closed or setup.relay.statistics().circuits:
                await trio.sleep(0.01)
        assert await pool.upgrade(RELAYED.peer_id, towards="127.0.0.1")  # already direct


async def test_without_hole_punching_the_relayed_channel_stays() -> None:
    async with relayed_peer(offer_punch=False) as setup, open_connection_pool(ALICE) as pool:
        relayed = await pool.get("127.0.0.1", setup.port, RELAYED.peer_id)
        with pytest.raises(RemoteError):
            await dial_direct(relayed, ALICE, RELAYED.peer_id, towards="127.0.0.1", punch=QUICK)
        assert not await pool.upgrade(RELAYED.peer_id, towards="127.0.0.1", punch=QUICK)
        assert await pool.get("127.0.0.1", setup.port, RELAYED.peer_id) is relayed
        await _forward(relayed)


async def test_the_direct_handshake_still_checks_the_peer_id() -> None:
    async with relayed_peer() as setup, open_connection_pool(ALICE) as pool:
        relayed = await pool.get("127.0.0.1", setup.port, RELAYED.peer_id)
        with pytest.raises(PeerIdMismatch):  # asking for BOB: the direct peer proves RELAYED
            await dial_direct(relayed, ALICE, BOB.peer_id, towards="127.0.0.1", punch=QUICK)


def test_observed_addresses_join_the_given_ones() -> None:
    given = [("10.0.0.5", 4000)]
    assert with_observed(given, ["203.0.113.9", "203.0.113.9", "", "2001:db8::/64"]) == [
        ("10.0.0.5", 4000),
        ("203.0.113.9", 4000),
    ]
    assert with_observed(given, ["10.0.0.5"]) == given  # nothing new
    many = [f"198.51.100.{i}" for i in range(10)]
    assert len(with_observed(given, many)) == 4  # what a PunchConnect may carry


async def test_the_relayed_peer_dials_the_callers_address_as_its_relay_saw_it() -> None:
    """A caller behind a NAT announces an address nobody can reach (its LAN's); the relay
    saw it come from 127.0.0.2, and the relayed peer's dial there is what connects."""
    async with relayed_peer() as setup:
        transport = TCPTransport("127.0.0.2")  # the caller's "public" address
        async with open_connection_pool(ALICE, transport=transport) as pool:
            relayed = await pool.get("127.0.0.1", setup.port, RELAYED.peer_id)
            with trio.fail_after(10), PunchPoint("127.0.0.2") as point:
                lan = PunchAddress(host="192.0.2.1", port=point.port)  # unroutable here
                async with open_hole_punch(relayed, timeout=5.0) as stream:
                    await stream.send(PunchConnect(addresses=(lan,)))
                    theirs = await stream.receive(PunchConnect)
                    await stream.send(PunchSync())
                    await stream.send_end()
                    assert theirs.addresses  # R's own; we only accept here, so a
                    # connection can come only from R dialing 127.0.0.2 (192.0.2.1 is void)
                    direct = await point.meet([], window=2.0, retry=0.01)
            assert direct is not None
            assert direct.socket.getsockname() == ("127.0.0.2", point.port)
            await direct.aclose()
        assert setup.punch is not None and setup.punch.upgraded == 1


def test_a_relayed_peer_dials_only_the_callers_observed_address() -> None:
    public = "93.184.216.34"  # (documentation ranges count as private in ipaddress)
    named = [("151.101.1.69", 40000), ("192.168.1.5", 40001), (public, 40000)]
    # whatever hosts are named, only the one the relay saw, at the ports named
    assert punch_targets(named, public, ()) == [(public, 40000), (public, 40001)]
    assert punch_targets(named, public, (), limit=1) == [(public, 40000)]
    # behind our own NAT (the caller comes from our public address): its LAN address too
    assert ("192.168.1.5", 40001) in punch_targets(named, public, (public,))
    assert ("151.101.1.69", 40000) not in punch_targets(named, public, (public,))
    # an IPv6 caller (its host key is its /64): only named addresses inside it
    v6 = [("2001:4860:4860::8888", 40000), ("2606:4700::1111", 40000)]
    assert punch_targets(v6, "2001:4860:4860::/64", ()) == [v6[0]]


def test_an_initiator_dials_few_and_only_plausible_addresses() -> None:
    named = [
        ("127.0.0.1", 40000), ("192.168.1.5", 40000), ("0.0.0.0", 40000),
        ("224.0.0.1", 40000), ("93.184.216.34", 80), ("93.184.216.34", 40000),
        ("151.101.1.69", 40000),
    ]  # fmt: skip
    # from a public address: no loopback, LAN, unspecified, multicast or low port; two at most
    assert initiator_targets(named, "8.8.4.4") == [
        ("93.184.216.34", 40000), ("151.101.1.69", 40000),
    ]  # fmt: skip
    # from a LAN: its private addresses too, but no loopback
    assert initiator_targets(named, "192.168.1.9") == [
        ("192.168.1.5", 40000), ("93.184.216.34", 40000),
    ]  # fmt: skip
    assert initiator_targets(named, "127.0.0.1", limit=1) == [("127.0.0.1", 40000)]


async def test_punches_are_rationed_per_peer_host_and_address_group(
    autojump_clock: trio.testing.MockClock,
) -> None:
    admission = PunchAdmission(
        peer_rate=0.1, peer_burst=2, host_rate=0.1, host_burst=3, group_rate=0.1, group_burst=4
    )
    alice, bob = ALICE.peer_id, BOB.peer_id
    a, b, c = "93.184.1.1", "93.184.2.2", "93.184.3.3"  # one /16
    assert admission.admit(alice, a) is None and admission.admit(alice, a) is None
    assert "peer" in (admission.admit(alice, a) or "")  # the flood: this peer's burst is spent
    assert "host" in (admission.admit(bob, a) or "")  # another peer, same host: 3 asks spent
    assert "group" in (admission.admit(bob, c) or "")  # another host, same /16: 4 spent
    assert admission.admit(bob, "151.101.1.1") is None  # another group
    await trio.sleep(20)  # the buckets refill (0.1 per second)
    assert admission.admit(alice, b) is None
    # an initiator's dials draw on the target's group
    assert [admission.may_dial("151.101.9.9") for _ in range(5)] == [True] * 4 + [False]


def test_a_failed_peer_is_tried_again_after_a_doubling_backoff() -> None:
    backoff = PunchBackoff(base=300.0, cap=1000.0, max_peers=2)
    peer = ALICE.peer_id
    assert backoff.allowed(peer, 0.0)
    assert backoff.failed(peer, 0.0) == 300.0
    assert not backoff.allowed(peer, 299.0) and backoff.allowed(peer, 300.0)
    assert backoff.failed(peer, 300.0) == 600.0
    assert backoff.failed(peer, 900.0) == 1000.0  # capped
    assert backoff.failures(peer) == 3
    backoff.succeeded(peer)
    assert backoff.allowed(peer, 900.0) and backoff.failures(peer) == 0
    for i in range(5):  # bounded memory
        backoff.failed(Identity.from_seed(bytes([i])).peer_id, 0.0)
    assert len(backoff) == 2


async def test_a_punch_over_a_direct_channel_is_refused() -> None:
    """Only a caller whose relay named its address gets a punch: over a direct channel the
    caller's claimed addresses cannot be checked against anyone's observation."""
    punch = HolePunchService(lambda stream, peer: trio.sleep(0), QUICK)
    rpc = RpcServer(RELAYED, HandlerRegistry([punch.binding()]))
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(punch.run)
            port = await nursery.start(rpc.serve, "127.0.0.1", 0)
            async with open_connection_pool(ALICE) as pool:
                conn = await pool.get("127.0.0.1", port, RELAYED.peer_id)
                with pytest.raises(LimitExceeded, match="through a relay"):
                    await dial_direct(conn, ALICE, RELAYED.peer_id, towards="127.0.0.1")
            assert punch.refused == 1 and punch.upgraded == 0
            nursery.cancel_scope.cancel()


async def test_a_caller_cannot_make_the_relayed_peer_dial_a_third_party() -> None:
    """The caller names a third party's address (127.0.0.5, listening); the relayed peer
    dials only where the relay saw the caller (127.0.0.1), so the third party sees nothing."""
    async with relayed_peer() as setup, open_connection_pool(ALICE) as pool:
        relayed = await pool.get("127.0.0.1", setup.port, RELAYED.peer_id)
        with trio.fail_after(10), PunchPoint("127.0.0.5") as victim:
            async with open_hole_punch(relayed, timeout=5.0) as stream:
                target = PunchAddress(host="127.0.0.5", port=victim.port)
                await stream.send(PunchConnect(addresses=(target,)))
                await stream.receive(PunchConnect)
                await stream.send(PunchSync())
                await stream.send_end()
                knocked = await victim.meet([], window=1.0, retry=0.01)
        assert knocked is None
        assert setup.punch is not None and setup.punch.upgraded == 0


async def test_the_direct_socket_is_served_only_to_the_peer_that_asked() -> None:
    """The relayed peer runs the handshake on a punched socket expecting the caller's
    `PeerId`: someone else who reaches the socket first is refused."""
    rpc = RpcServer(RELAYED, HandlerRegistry([]))

    async def only_alice(stream: trio.abc.Stream) -> None:
        await rpc.handle_stream(stream, expected_peer=ALICE.peer_id)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(TCPTransport().serve, only_alice, "127.0.0.1", 0)
            with pytest.raises(LimitExceeded, match="another peer"):
                await open_channel(TCPTransport(), "127.0.0.1", port, BOB)
            channel = await open_channel(TCPTransport(), "127.0.0.1", port, ALICE)
            assert channel.remote_peer_id == RELAYED.peer_id
            await channel.aclose()
            assert rpc.statistics().refused_unexpected == 1
            nursery.cancel_scope.cancel()


async def test_a_punch_that_never_connects_is_tried_three_times_then_backs_off() -> None:
    """DCUtR's retries: three exchanges, each with a fresh port and round trip; then the
    relayed channel stays, works, and the peer is not punched again during the backoff.
    `try_upgrade` does not hold its caller for the punch: it returns after ``wait``."""
    never = NeverPunches()
    quick = PunchConfig(window=0.3, exchange_timeout=5.0, wait=0.05)
    async with relayed_peer(never=never) as setup, open_connection_pool(ALICE) as pool:
        relayed = await pool.get("127.0.0.1", setup.port, RELAYED.peer_id)
        with pytest.raises(ConnectError, match="3 attempts"):
            await dial_direct(relayed, ALICE, RELAYED.peer_id, towards="127.0.0.1", punch=quick)
        assert never.calls == 3
        with trio.fail_after(10):
            upgraded = await pool.try_upgrade(RELAYED.peer_id, towards="127.0.0.1", punch=quick)
            assert not upgraded and never.calls < 6  # went on before the punch ended
            await _forward(await pool.get("127.0.0.1", setup.port, RELAYED.peer_id))
            while pool.punch_failures(RELAYED.peer_id) == 0:
                await trio.sleep(0.05)
        assert never.calls == 6
        assert not await pool.try_upgrade(RELAYED.peer_id, towards="127.0.0.1", punch=quick)
        assert never.calls == 6  # backing off: not asked again
        assert await pool.get("127.0.0.1", setup.port, RELAYED.peer_id) is relayed
        await _forward(relayed)


async def test_punches_per_caller_host_are_limited() -> None:
    config = PunchConfig(window=2.0, exchange_timeout=5.0, host_rate=0.001, host_burst=1)
    async with relayed_peer(config=config) as setup, open_connection_pool(ALICE) as pool:
        relayed = await pool.get("127.0.0.1", setup.port, RELAYED.peer_id)
        first = await dial_direct(relayed, ALICE, RELAYED.peer_id, towards="127.0.0.1")
        await first.aclose()
        with pytest.raises(LimitExceeded):
            await dial_direct(relayed, ALICE, RELAYED.peer_id, towards="127.0.0.1")
        await _forward(relayed)  # the relayed channel is untouched


async def test_a_peer_flooding_punches_is_refused_while_others_still_get_theirs() -> None:
    """ALICE asks again and again: past her burst she is refused (`limit_exceeded`), her
    relayed channel keeps working, and BOB (another host, 127.0.0.2) still gets a punch."""
    config = PunchConfig(window=2.0, exchange_timeout=5.0, peer_rate=0.001, peer_burst=2)
    async with relayed_peer(config=config) as setup:
        async with open_connection_pool(ALICE) as pool:
            relayed = await pool.get("127.0.0.1", setup.port, RELAYED.peer_id)
            refused = 0
            for _ in range(6):
                try:
                    channel = await dial_direct(
                        relayed, ALICE, RELAYED.peer_id, towards="127.0.0.1", punch=config
                    )
                except LimitExceeded:
                    refused += 1
                else:
                    await channel.aclose()
            assert refused == 4  # two answered, then the flood is cut off
            await _forward(relayed)
        async with open_connection_pool(BOB, transport=TCPTransport("127.0.0.2")) as pool:
            relayed = await pool.get("127.0.0.1", setup.port, RELAYED.peer_id)
            channel = await dial_direct(
                relayed, BOB, RELAYED.peer_id, towards="127.0.0.1", punch=config
            )
            await channel.aclose()
        assert setup.punch is not None
        assert setup.punch.upgraded == 3 and setup.punch.refused == 4
