"""Relays on loopback: a dialer reaches a peer that accepts nothing through a relay that
splices its stream onto the peer's connect-back; the Noise handshake runs end to end, so
the relay cannot read, change or impersonate; quotas refuse with `LimitExceeded` while
other circuits keep working; a private swarm's relay splices only members."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import torch
import trio

from swarm.directory import ServerView, ping_server
from swarm.errors import (
    LimitExceeded,
    PeerIdMismatch,
    SwarmError,
    SwarmKeyMismatch,
    unwrap_group,
)
from swarm.identity import Identity
from swarm.net.handshake import open_channel
from swarm.net.messages import (
    ForwardRequest,
    ForwardResponse,
    InfoRequest,
    InfoResponse,
    RelayHop,
)
from swarm.net.methods import HandlerRegistry
from swarm.net.pool import open_connection_pool
from swarm.net.relay import RelayLimits, RelayService, hold_reservation
from swarm.net.rpc import CallContext
from swarm.net.rpc_server import RpcServer
from swarm.net.surface import FORWARD, INFO, call_forward
from swarm.net.transport import TCPTransport, Transport
from swarm.testing.reach import TappedTransport
from swarm.types import LayerRange, ServerState

from .conftest import ALICE, BOB

RELAY = Identity.from_seed(b"relay")
RELAYED = Identity.from_seed(b"relayed")
KEY = b"R" * 32


class Echo:
    """The relayed peer's handlers: ``forward`` answers its input; ``info`` (pings)."""

    def __init__(self) -> None:
        self.calls = 0
        self.infos = 0
        self.hosts: list[str | None] = []  # the caller's host as each forward saw it

    async def rpc_info(self, request: InfoRequest, ctx: CallContext) -> InfoResponse:
        self.infos += 1
        return InfoResponse(
            layer_range=LayerRange(0, 1), state=ServerState.ONLINE, load=0.0,
            free_cache_tokens=0, version="test", throughput=1.0, relayed=True,
        )  # fmt: skip

    async def rpc_forward(self, request: ForwardRequest, ctx: CallContext) -> ForwardResponse:
        self.calls += 1
        self.hosts.append(ctx.peer_host)
        return ForwardResponse(hidden_states=request.hidden_states)


@dataclass
class Relayed:
    port: int  # the relay's
    relay: RelayService
    echo: Echo
    observed: str  # where the relay saw the relayed peer come from


@asynccontextmanager
async def relayed_peer(
    *,
    relay_transport: Transport | None = None,
    limits: RelayLimits | None = None,
    swarm_key: bytes | None = None,
) -> AsyncIterator[Relayed]:
    """A relay on 127.0.0.1 and a peer (listening nowhere) holding a reservation there."""
    relay = RelayService(RELAY, swarm_key=swarm_key, limits=limits)
    relay_rpc = RpcServer(
        RELAY,
        HandlerRegistry([relay.binding()]),
        transport=relay_transport,
        swarm_key=swarm_key,
        relay=relay,
    )
    echo = Echo()
    relayed_rpc = RpcServer(
        RELAYED,
        HandlerRegistry([FORWARD.bind(echo.rpc_forward), INFO.bind(echo.rpc_info)]),
        swarm_key=swarm_key,
    )
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(relay_rpc.serve, "127.0.0.1", 0)
            async with open_connection_pool(RELAYED, swarm_key=swarm_key) as pool:
                conn = await pool.get("127.0.0.1", port, RELAY.peer_id)
                observed = await nursery.start(
                    hold_reservation, conn, TCPTransport(), "127.0.0.1", port,
                    relayed_rpc.handle_stream,
                )  # fmt: skip
                yield Relayed(port, relay, echo, observed)
                nursery.cancel_scope.cancel()


def payload(data: bytes) -> ForwardRequest:
    ids = torch.frombuffer(bytearray(data), dtype=torch.int64).reshape(1, -1, 1)
    return ForwardRequest(
        hidden_states=ids, positions=torch.zeros(1, ids.shape[1], dtype=torch.int64),
        layer_range=LayerRange(0, 1),
    )  # fmt: skip


async def echo_through(
    port: int, data: bytes, *, identity: Identity = ALICE, local_host: str | None = None,
    swarm_key: bytes | None = None, timeout: float = 10.0,
) -> bytes:  # fmt: skip
    transport = TCPTransport(local_host)
    try:
        async with open_connection_pool(identity, transport=transport, swarm_key=swarm_key) as pool:
            conn = await pool.get("127.0.0.1", port, RELAYED.peer_id)
            answer = await call_forward(conn, payload(data), timeout=timeout)
    except BaseExceptionGroup as group:
        raise unwrap_group(group) from None
    return answer.hidden_states.numpy().tobytes()


async def test_a_dialer_reaches_the_relayed_peer_and_the_relay_sees_only_ciphertext() -> None:
    tap = TappedTransport()
    marker = b"PLAINTEXT-MARKER" * 512  # 8 KiB a relay that could read would see
    async with relayed_peer(relay_transport=tap) as setup:
        assert await echo_through(setup.port, marker) == marker
        stats = setup.relay.statistics()
    assert setup.echo.calls == 1
    assert stats.circuits_total == 1 and stats.bytes_relayed > len(marker)
    assert len(tap.received) > 2 * len(marker)  # both legs passed through the relay
    assert b"PLAINTEXT-MARKER" not in tap.received


async def test_a_flipped_byte_fails_authentication() -> None:
    tap = TappedTransport(flip_at=20_000)  # inside the request, past the handshake
    async with relayed_peer(relay_transport=tap) as setup:
        with pytest.raises(SwarmError):
            await echo_through(setup.port, os.urandom(64 * 1024), timeout=5.0)
        assert tap.flipped >= 1
        assert setup.echo.calls == 0  # the altered request never reached a handler
        assert await echo_through(setup.port, b"stillok!") == b"stillok!"


async def test_a_relay_answering_the_handshake_itself_is_refused() -> None:
    async with relayed_peer() as setup:
        # BOB holds no reservation: the relay answers as itself, and the dialer hangs up
        with pytest.raises(PeerIdMismatch):
            await open_channel(
                TCPTransport(), "127.0.0.1", setup.port, ALICE, expected_peer=BOB.peer_id
            )


async def test_circuits_in_a_loop_hit_the_per_dialer_quota() -> None:
    limits = RelayLimits(circuits_per_dialer=2, circuit_rate=100.0)
    async with relayed_peer(limits=limits) as setup:
        held = []
        try:
            for _ in range(2):
                held.append(
                    await open_channel(
                        TCPTransport(),
                        "127.0.0.1",
                        setup.port,
                        ALICE,
                        expected_peer=RELAYED.peer_id,
                    )
                )
            with pytest.raises(LimitExceeded):
                await open_channel(
                    TCPTransport(), "127.0.0.1", setup.port, ALICE, expected_peer=RELAYED.peer_id
                )
            # another address still gets through, and the held circuits still carry data
            assert await echo_through(setup.port, b"12345678", local_host="127.0.0.2") == (
                b"12345678"
            )
            await held[0].send(b"ping")  # (the channel is open end to end)
        finally:
            for channel in held:
                await channel.aclose()
        assert setup.relay.statistics().refused >= 1


@pytest.mark.slow  # it measures a throttled transfer on the wall clock (about 3 s)
async def test_bytes_beyond_the_rate_are_slowed_and_new_circuits_refused() -> None:
    rate = 256 * 1024
    limits = RelayLimits(bytes_per_second=rate, burst_bytes=rate, circuit_rate=100.0)
    async with relayed_peer(limits=limits) as setup:
        big = os.urandom(512 * 1024)  # 1 MiB through the relay with the answer
        refused = 0
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            done = trio.Event()

            async def transfer() -> None:
                assert await echo_through(setup.port, big, timeout=30.0) == big
                done.set()

            nursery.start_soon(transfer)
            await trio.sleep(0.5)
            for _ in range(10):
                if done.is_set():
                    break
                try:
                    await echo_through(setup.port, b"12345678")
                except LimitExceeded:
                    refused += 1
                # a dialer at another address is not held back by this one's rate
                assert await echo_through(setup.port, b"abcdefgh", local_host="127.0.0.2") == (
                    b"abcdefgh"
                )
                await trio.sleep(0.1)
        elapsed = trio.current_time() - started
    assert refused >= 1
    assert elapsed >= (2 * len(big) - rate) / rate * 0.8  # throttled to about the rate


async def test_a_private_swarms_relay_splices_only_members() -> None:
    async with relayed_peer(swarm_key=KEY) as setup:
        assert await echo_through(setup.port, b"members!", swarm_key=KEY) == b"members!"
        with pytest.raises(SwarmKeyMismatch):
            await echo_through(setup.port, b"outsider", swarm_key=b"X" * 32)
        with pytest.raises(SwarmKeyMismatch):
            await echo_through(setup.port, b"outsider")


async def test_a_ping_to_a_relayed_server_goes_through_its_relay() -> None:
    """The client's ping (what the route planner counts) to a relayed server is measured
    over the relay: a circuit carries it, so the RTT holds both legs. (Servers' announced
    next-hop pings dial `ServerView.address` the same way.)"""
    async with relayed_peer() as setup:
        hop = RelayHop(peer_id=RELAY.peer_id, host="127.0.0.1", port=setup.port)
        view = ServerView(
            RELAYED.peer_id, f"127.0.0.1:{setup.port}", LayerRange(0, 1), 1.0, 0, relays=(hop,)
        )
        async with open_connection_pool(ALICE) as pool:
            rtt = await ping_server(pool, view, timeout=10.0)
        assert rtt > 0
        assert setup.echo.infos == 1
        stats = setup.relay.statistics()
        assert stats.circuits_total == 1 and stats.bytes_relayed > 0


async def test_the_relayed_peer_sees_the_dialers_address_and_its_own() -> None:
    """Per-host caps and fair shares at a relayed peer count the dialer's address (as the
    relay saw it), not the relay's; the relay tells the relayed peer where it sees it."""
    async with relayed_peer() as setup:
        assert setup.observed == "127.0.0.1"
        assert await echo_through(setup.port, b"12345678", local_host="127.0.0.2") == b"12345678"
        assert await echo_through(setup.port, b"12345678") == b"12345678"
    assert setup.echo.hosts == ["127.0.0.2", "127.0.0.1"]
