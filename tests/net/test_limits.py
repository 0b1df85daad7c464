"""Connection limits of `RpcServer` and the receive budget, on loopback TCP.

Each test stands up a real server on 127.0.0.1:0 with small limits and checks one limit
from the outside: what a dialer sees, and that other peers keep being served. The timeouts
(handshake, idle, message) run on trio's virtual clock (`autojump_clock`): server and
dialers are in this process, on loopback sockets or memory streams, with no thread.
"""

from __future__ import annotations

import os
import resource
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

import pytest
import torch
import trio
import trio.testing

from swarm.errors import ConnectionClosed, HandshakeError, LimitExceeded, ProtocolError
from swarm.identity import Identity
from swarm.net.channel import ReceiveBudget, ReceiveBudgetStatistics, SecureChannel
from swarm.net.config import NetConfig
from swarm.net.handshake import open_channel, secure_outbound
from swarm.net.messages import ForwardRequest, ForwardResponse, InfoRequest, InfoResponse, Message
from swarm.net.methods import HandlerRegistry, Streaming, TypedStream, Unary
from swarm.net.pool import open_connection_pool
from swarm.net.rpc import CallContext, RpcConnection
from swarm.net.rpc_server import RpcServer
from swarm.net.transport import TCPTransport
from swarm.types import LayerRange

from .conftest import ALICE, BOB, channel_pair

INFO = InfoResponse(LayerRange(0, 4), "online", 0.0, 100, "test", 1.0)
HOST = "127.0.0.1"
MANY = 10_000  # "no limit here" for the caps a test does not look at


class Handlers:
    def __init__(self) -> None:
        self.gate = trio.Event()

    async def rpc_info(self, request: InfoRequest, ctx: CallContext) -> InfoResponse:
        return INFO

    async def rpc_forward(self, request: ForwardRequest, ctx: CallContext) -> ForwardResponse:
        return ForwardResponse(request.hidden_states)

    async def rpc_hold(self, stream: TypedStream[Message, Message], ctx: CallContext) -> None:
        await self.gate.wait()

    def registry(self) -> HandlerRegistry:
        return HandlerRegistry(
            [
                Unary("info", InfoRequest, InfoResponse).bind(self.rpc_info),
                Unary("forward", ForwardRequest, ForwardResponse).bind(self.rpc_forward),
                Streaming("hold", up=(InfoRequest,), down=(InfoResponse,)).bind(self.rpc_hold),
            ]
        )


@asynccontextmanager
async def serving(config: NetConfig) -> AsyncIterator[tuple[RpcServer, int, Handlers]]:
    handlers = Handlers()
    server = RpcServer(BOB, handlers.registry(), config=config)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, HOST, 0)
        yield server, port, handlers
        nursery.cancel_scope.cancel()


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.005)


async def dial(port: int, identity: Identity, config: NetConfig | None = None) -> SecureChannel:
    return await open_channel(TCPTransport(), HOST, port, identity, config=config or NetConfig())


async def call_info(port: int, identity: Identity = ALICE) -> InfoResponse:
    async with open_connection_pool(identity) as pool:
        return await pool.call(HOST, port, "info", InfoRequest(), InfoResponse, timeout=5)


async def read_to_eof(stream: trio.SocketStream) -> bytes:
    out = b""
    try:
        while chunk := await stream.receive_some():
            out += chunk
    except trio.BrokenResourceError:
        pass
    return out


async def send_until_closed(channel: SecureChannel, data: bytes) -> None:
    """Send in the background; the receiver may close the channel on us (that is the test)."""
    try:
        await channel.send(data)
    except ConnectionClosed:
        pass


@contextmanager
def fd_limit(soft: int) -> Iterator[None]:
    old_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (old_soft, hard))


async def test_idle_authenticated_channels_cannot_lock_out_a_new_client() -> None:
    # The real problem scaled down: ~1000 idle channels exhaust a server's 1024 descriptors.
    # Here 150 idle channels would need 300 descriptors in this process (both ends), and
    # the limit is 240; with the server keeping at most 50 it needs about 150 + 50.
    config = NetConfig(
        max_connections=50, max_connections_per_ip=MANY, max_connections_per_peer=MANY
    )
    idle: list[SecureChannel] = []
    with fd_limit(len(os.listdir("/proc/self/fd")) + 240), trio.fail_after(60):
        async with serving(config) as (server, port, _):
            try:
                for _ in range(150):
                    idle.append(await dial(port, Identity.generate()))
            except (OSError, HandshakeError, ConnectionClosed) as exc:
                pytest.fail(f"descriptors ran out after {len(idle)} idle channels: {exc!r}")
            finally:
                stats = server.statistics()
                assert await call_info(port) == INFO
                for channel in idle:
                    await channel.aclose()
    assert stats.connections <= 50
    assert stats.evicted_idle >= 100


async def test_a_peer_over_its_cap_is_refused_with_a_clear_error() -> None:
    config = NetConfig(max_connections_per_peer=2, max_connections_per_ip=MANY)
    with trio.fail_after(10):
        async with serving(config) as (server, port, _):
            first, second = await dial(port, ALICE), await dial(port, ALICE)
            with pytest.raises(LimitExceeded, match="maximum of channels from this peer"):
                await dial(port, ALICE)
            other = await dial(port, Identity.generate())  # another peer is not affected
            assert server.statistics().refused_per_peer == 1
            await first.aclose()
            await wait_until(lambda: server.statistics().connections == 2)
            again = await dial(port, ALICE)  # room again once one closed
            for channel in (second, other, again):
                await channel.aclose()


async def test_an_ip_over_its_cap_is_closed_before_the_handshake() -> None:
    config = NetConfig(max_connections_per_ip=2)
    with trio.fail_after(10):
        async with serving(config) as (server, port, _):
            held: list[trio.abc.AsyncResource] = [await dial(port, ALICE)]
            held.append(await trio.open_tcp_stream(HOST, port))
            await wait_until(lambda: server.statistics().handshaking == 1)
            with pytest.raises(HandshakeError, match="before the handshake began"):
                await dial(port, Identity.generate())
            assert server.statistics().refused_per_ip == 1
            for thing in held:
                await thing.aclose()


async def test_unauthenticated_connections_make_room_oldest_first() -> None:
    # A long handshake deadline: only eviction can close the first silent connection soon.
    config = NetConfig(max_handshakes=2, handshake_timeout=60)
    with trio.fail_after(10):
        async with serving(config) as (server, port, _):
            silent = []
            for n in range(1, 4):
                silent.append(await trio.open_tcp_stream(HOST, port))
                await wait_until(lambda n=n: server.statistics().handshaking == min(n, 2))  # type: ignore[misc]
            assert await read_to_eof(silent[0]) == b""  # the oldest was closed for the third
            assert server.statistics().evicted_handshakes == 1
            channel = await dial(port, ALICE)  # a real client still gets in
            assert server.statistics().handshaking == 1
            await channel.aclose()
            for stream in silent:
                await stream.aclose()


async def test_a_silent_connection_is_closed_at_the_handshake_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = NetConfig(handshake_timeout=0.3)
    with trio.fail_after(10):
        async with serving(config) as (server, port, _):
            stream = await trio.open_tcp_stream(HOST, port)
            assert await read_to_eof(stream) == b""
            await wait_until(lambda: server.statistics().handshake_failures == 1)
            assert server.statistics().handshaking == 0


async def test_idle_channels_are_closed_and_busy_ones_kept(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = NetConfig(idle_timeout=0.3)
    with trio.fail_after(20):
        async with (
            serving(config) as (server, port, handlers),
            open_connection_pool(ALICE) as idle_pool,
            open_connection_pool(Identity.generate()) as busy_pool,
        ):
            idle = await idle_pool.get(HOST, port)
            assert await idle.call("info", InfoRequest(), InfoResponse) == INFO
            busy = await busy_pool.get(HOST, port)
            async with busy.open_stream("hold", timeout=10):
                await wait_until(lambda: idle.is_closed)
                await trio.sleep(3 * config.idle_timeout)  # well past the idle timeout
                assert not busy.is_closed
                assert server.statistics().closed_idle == 1
                handlers.gate.set()
            await wait_until(lambda: busy.is_closed)  # idle once its stream ended
            assert server.statistics().closed_idle == 2
            # A pool redials a channel the server closed.
            assert await idle_pool.call(HOST, port, "info", InfoRequest(), InfoResponse) == INFO


class GatedStream(trio.abc.Stream):
    """Passes the first ``allowed`` bytes sent through it, then holds the rest until
    ``gate`` is set (a peer that stalls part-way through a message)."""

    def __init__(self, inner: trio.abc.Stream, allowed: int, gate: trio.Event) -> None:
        self.inner = inner
        self.allowed = allowed
        self.gate = gate

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        if self.allowed > 0:
            head, view = view[: self.allowed], view[self.allowed :]
            self.allowed -= len(head)
            await self.inner.send_all(head)
        if len(view):
            await self.gate.wait()
            await self.inner.send_all(view)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        pass

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


KiB = 1024
BIG = NetConfig(
    max_frame_size=16 * KiB,
    max_message_size=256 * KiB,
    max_receive_bytes=640 * KiB,
    max_connections_per_ip=MANY,
)


async def test_a_message_beyond_the_receive_budget_is_refused_and_others_work() -> None:
    gate = trio.Event()
    with trio.fail_after(20):
        async with serving(BIG) as (server, port, _), trio.open_nursery() as nursery:
            # A peer that sends 200 KiB of a 256 KiB message and stalls holds ~200 KiB.
            raw = await trio.open_tcp_stream(HOST, port)
            hog = await secure_outbound(GatedStream(raw, 200 * KiB, gate), ALICE, config=BIG)
            nursery.start_soon(send_until_closed, hog, bytes(256 * KiB))
            await wait_until(lambda: server.statistics().receive_budget_in_use >= 180 * KiB)
            # A full-size message now needs 512 KiB more (frames, then their join): refused.
            big = await dial(port, Identity.generate(), BIG)
            await big.send(bytes(256 * KiB))
            with pytest.raises(ConnectionClosed):
                await big.receive()
            stats = server.statistics()
            assert stats.receive_budget_refused == 1
            assert stats.receive_budget_in_use < 256 * KiB  # the refused one released its own
            assert await call_info(port) == INFO  # a normal channel is served meanwhile
            gate.set()  # the hog finishes; its bytes are released
            await wait_until(lambda: server.statistics().receive_budget_in_use == 0)
            assert await call_info(port) == INFO


async def test_a_stalled_message_of_several_frames_times_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = NetConfig(max_frame_size=1024, message_timeout=0.3)
    a_raw, b_raw = trio.testing.memory_stream_pair()
    gate = trio.Event()
    # Alice's bytes that pass: her handshake (6 + 34 + 162), one small message (4 + 7 + 16)
    # and the first frame (4 + 1024 + 16) of a three-frame message; then she stalls.
    allowed = 6 + 34 + 162 + (4 + 7 + 16) + (4 + 1024 + 16)
    a, b = await channel_pair(GatedStream(a_raw, allowed, gate), b_raw, config=config)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await a.send(b"warm-up")
            assert await b.receive() == b"warm-up"
            nursery.start_soon(send_until_closed, a, bytes(3000))
            with pytest.raises(ProtocolError, match="took over"):
                await b.receive()
            gate.set()


class FromAddress(TCPTransport):
    """TCP from a chosen local address (any of 127.0.0.0/8 on Linux): many "hosts" on
    one machine, so the per-IP cap is not what stops them."""

    def __init__(self, local_address: str) -> None:
        self.local_address = local_address

    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        return await trio.open_tcp_stream(host, port, local_address=self.local_address)


@pytest.mark.slow
async def test_1000_idle_channels_with_default_limits_do_not_lock_out_a_new_client() -> None:
    # The acceptance case at full size with the default NetConfig: 1000 authenticated
    # channels from 20 addresses (50 each, under the per-IP cap), all left idle.
    config = NetConfig()
    idle: list[SecureChannel] = []
    with trio.fail_after(120):
        async with serving(config) as (server, port, _):
            for i in range(1000):
                transport = FromAddress(f"127.0.1.{1 + i // 50}")
                idle.append(await open_channel(transport, HOST, port, Identity.generate()))
            stats = server.statistics()
            assert await call_info(port) == INFO  # from 127.0.0.1, a new peer
            for channel in idle:
                await channel.aclose()
    # Inbound sockets stay under what 1024 descriptors can hold, whatever idle peers do.
    assert stats.connections + stats.handshaking <= config.max_connections + config.max_handshakes
    assert stats.connections == config.max_connections
    assert stats.evicted_idle == 1000 - config.max_connections


async def test_a_channel_over_the_budget_fails_alone_and_releases_what_it_held() -> None:
    config = NetConfig(max_frame_size=1024, max_message_size=8 * KiB)
    budget = ReceiveBudget(16 * KiB)
    assert budget.try_reserve(12 * KiB)  # what other channels hold
    a, b = await channel_pair(config=config, receive_budget=budget)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_until_closed, a, bytes(1000))  # one frame: not counted
            assert await b.receive() == bytes(1000)
            nursery.start_soon(send_until_closed, a, bytes(6 * KiB))  # 4 KiB left: no room
            with pytest.raises(LimitExceeded, match="receive budget"):
                await b.receive()
    assert b.is_closed
    assert budget.statistics() == ReceiveBudgetStatistics(16 * KiB, 12 * KiB, 1)
    with pytest.raises(ConnectionClosed):
        await b.receive()


async def test_a_pool_channel_refused_by_the_budget_is_closed_and_redialed() -> None:
    budget = ReceiveBudget(BIG.max_receive_bytes)
    hidden = torch.zeros(1, 25, 1024)  # 100 KiB of float32: a reply of seven frames
    request = ForwardRequest(hidden, torch.zeros(1, 25, dtype=torch.int64), LayerRange(0, 1))
    with trio.fail_after(20):
        async with (
            serving(BIG) as (_, port, _),
            open_connection_pool(ALICE, config=BIG, receive_budget=budget) as pool,
        ):
            assert budget.try_reserve(500 * KiB)  # held by the process's other channels
            with pytest.raises(ConnectionClosed):
                await pool.call(HOST, port, "forward", request, ForwardResponse, timeout=10)
            assert budget.statistics().refused == 1
            budget.release(500 * KiB)
            reply = await pool.call(HOST, port, "forward", request, ForwardResponse, timeout=10)
            assert torch.equal(reply.hidden_states, hidden)
            assert pool.statistics().dials == 2


async def test_a_handshake_flood_from_one_address_displaces_its_own_first() -> None:
    config = NetConfig(max_handshakes=4, handshake_timeout=60)
    gate = trio.Event()
    with trio.fail_after(20):
        async with serving(config) as (server, port, _), trio.open_nursery() as nursery:
            # The oldest handshake is a slow but real client from its own address.
            raw = await trio.open_tcp_stream(HOST, port, local_address="127.0.2.1")
            result: list[SecureChannel] = []

            async def slow_client() -> None:
                result.append(await secure_outbound(GatedStream(raw, 0, gate), ALICE))

            nursery.start_soon(slow_client)
            await wait_until(lambda: server.statistics().handshaking == 1)
            flood = []
            for n in range(2, 6):  # three fill the table, the fourth displaces one of them
                flood.append(await trio.open_tcp_stream(HOST, port, local_address="127.0.2.2"))
                await wait_until(lambda n=n: server.statistics().handshaking == min(n, 4))  # type: ignore[misc]
            assert await read_to_eof(flood[0]) == b""
            assert server.statistics().evicted_handshakes == 1
            gate.set()  # the slow client, globally the oldest, was kept and now finishes
            await wait_until(lambda: bool(result))
            await result[0].aclose()
            for stream in flood:
                await stream.aclose()


async def test_at_the_cap_the_address_with_most_channels_loses_an_idle_one() -> None:
    config = NetConfig(max_connections=4)
    with trio.fail_after(20):
        async with (
            serving(config) as (server, port, _),
            open_connection_pool(Identity.generate(), transport=FromAddress("127.0.3.1")) as lone,
        ):
            # The lone peer's channel is the idlest (opened first), but its address has one.
            single = await lone.get(HOST, port)
            crowd = [await dial(port, Identity.generate()) for _ in range(3)]  # from 127.0.0.1
            newcomer = await open_channel(FromAddress("127.0.3.2"), HOST, port, Identity.generate())
            assert server.statistics().evicted_idle == 1
            assert not single.is_closed
            assert await single.call("info", InfoRequest(), InfoResponse) == INFO
            for channel in [*crowd, newcomer]:
                await channel.aclose()


async def test_a_pool_replaces_a_channel_the_server_may_be_closing_for_idleness(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client = NetConfig(idle_timeout=0.4)
    with trio.fail_after(10):
        async with (
            serving(NetConfig()) as (_, port, _),
            open_connection_pool(ALICE, config=client) as pool,
        ):
            first = await pool.get(HOST, port)
            assert await first.call("info", InfoRequest(), InfoResponse) == INFO
            assert await pool.get(HOST, port) is first  # fresh: reused
            await trio.sleep(client.idle_timeout)  # past half the idle timeout
            second = await pool.get(HOST, port)
            assert second is not first
            await wait_until(lambda: first.is_closed)
            assert await second.call("info", InfoRequest(), InfoResponse) == INFO
            assert pool.statistics().dials == 2


async def test_a_channel_half_way_through_a_message_is_not_evicted() -> None:
    config = NetConfig(
        max_frame_size=16 * KiB,
        max_message_size=256 * KiB,
        max_receive_bytes=640 * KiB,
        max_connections=2,
    )
    gate = trio.Event()
    hidden = torch.ones(1, 25, 1024)  # 100 KiB: seven frames
    request = ForwardRequest(hidden, torch.zeros(1, 25, dtype=torch.int64), LayerRange(0, 1))
    with trio.fail_after(20):
        async with serving(config) as (server, port, _), trio.open_nursery() as nursery:
            # The uploader's channel has been quiet longest, but it is mid-message.
            raw = await trio.open_tcp_stream(HOST, port)
            channel = await secure_outbound(GatedStream(raw, 40 * KiB, gate), ALICE, config=config)
            uploader = RpcConnection(channel, None, config)
            await nursery.start(uploader.run)
            replies: list[ForwardResponse] = []

            async def upload() -> None:
                replies.append(await uploader.call("forward", request, ForwardResponse))

            nursery.start_soon(upload)
            await wait_until(lambda: server.statistics().receive_budget_in_use > 0)
            idle = await dial(port, Identity.generate())
            newcomer = await dial(port, Identity.generate())
            assert server.statistics().evicted_idle == 1
            with pytest.raises(ConnectionClosed):
                await idle.receive()  # the idle one made room
            gate.set()
            await wait_until(lambda: bool(replies))
            assert torch.equal(replies[0].hidden_states, hidden)
            await newcomer.aclose()
            await uploader.aclose()
