"""RPC: calls, streams, deadlines, remote errors, cancellation, concurrency, the pool."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import pytest
import torch
import trio

from swarm.errors import (
    ConnectionClosed,
    DeadlineExceeded,
    ErrorCode,
    LimitExceeded,
    PeerIdMismatch,
    RemoteError,
    ShardError,
)
from swarm.net.channel import AT_ONCE_MAX
from swarm.net.config import NetConfig
from swarm.net.messages import (
    ErrorResponse,
    ForwardRequest,
    ForwardResponse,
    InferenceInput,
    InferenceStepResult,
    InfoRequest,
    InfoResponse,
    Message,
    PushRequest,
)
from swarm.net.methods import Binding, HandlerRegistry, OneWay, Streaming, TypedStream, Unary
from swarm.net.pool import ConnectionPool, PoolStatistics, open_connection_pool
from swarm.net.rpc import CallContext, RpcConnection
from swarm.net.rpc_server import RpcServer
from swarm.net.surface import call_info
from swarm.net.transport import TCPTransport
from swarm.types import LayerRange

from .conftest import ALICE, BOB, channel_pair, tcp_stream_pair

INFO = InfoResponse(LayerRange(0, 4), "online", 0.0, 100, "test", 1.0)


class Handlers:
    def __init__(self) -> None:
        self.started = 0
        self.cancelled = 0
        self.gate = trio.Event()

    async def rpc_info(self, request: InfoRequest, ctx: CallContext) -> InfoResponse:
        assert ctx.peer_id == ALICE.peer_id
        return INFO

    async def rpc_forward(self, request: ForwardRequest, ctx: CallContext) -> ForwardResponse:
        await trio.sleep(0)
        return ForwardResponse(request.hidden_states * 2)

    async def rpc_fail(self, request: InfoRequest, ctx: CallContext) -> InfoResponse:
        raise ShardError("layer 7 is not loaded")

    async def rpc_note(self, request: InfoRequest, ctx: CallContext) -> InfoResponse:
        self.noted = getattr(self, "noted", 0) + 1
        self.gate.set()
        return INFO

    async def rpc_busy(self, request: InfoRequest, ctx: CallContext) -> InfoResponse:
        raise LimitExceeded("too many sessions")

    async def rpc_crash(self, request: InfoRequest, ctx: CallContext) -> InfoResponse:
        raise KeyError("oops")

    async def rpc_wrong(self, request: InfoRequest, ctx: CallContext) -> ErrorResponse:
        return ErrorResponse(ErrorCode.INTERNAL, "y")

    async def rpc_hang(self, request: InfoRequest, ctx: CallContext) -> InfoResponse:
        self.started += 1
        try:
            await trio.sleep_forever()
        finally:
            self.cancelled += 1

    async def rpc_wait(self, request: InfoRequest, ctx: CallContext) -> InfoResponse:
        await self.gate.wait()
        return INFO

    async def rpc_steps(
        self, stream: TypedStream[InferenceStepResult, InferenceInput], ctx: CallContext
    ) -> None:
        async for step in stream:
            await stream.send(InferenceStepResult(step.step, step.hidden_states + 1))

    async def rpc_bad_stream(self, stream: TypedStream[Message, Message], ctx: CallContext) -> None:
        await stream.receive_any()
        raise ShardError("cache lost")

    def registry(self) -> HandlerRegistry:
        def unary(name: str, handler: Callable[..., Awaitable[Message]]) -> Binding:
            return Unary(name, InfoRequest, InfoResponse).bind(handler)

        return HandlerRegistry(
            [
                *(
                    unary(name, handler)
                    for name, handler in [
                        ("info", self.rpc_info),
                        ("fail", self.rpc_fail),
                        ("note", self.rpc_note),
                        ("busy", self.rpc_busy),
                        ("crash", self.rpc_crash),
                        ("hang", self.rpc_hang),
                        ("wait", self.rpc_wait),
                    ]
                ),
                Unary("wrong", InfoRequest, ErrorResponse).bind(self.rpc_wrong),
                Unary("forward", ForwardRequest, ForwardResponse).bind(self.rpc_forward),
                STEPS.bind(self.rpc_steps),
                Streaming("bad_stream", up=(InfoRequest,), down=(InfoResponse,)).bind(
                    self.rpc_bad_stream
                ),
            ]
        )


STEPS: Streaming[InferenceInput, InferenceStepResult] = Streaming(
    "steps", up=(InferenceInput,), down=(InferenceStepResult,)
)


@pytest.fixture
async def rpc_pair() -> AsyncIterator[tuple[RpcConnection, Handlers]]:
    handlers = Handlers()
    a, b = await channel_pair()
    client, server = RpcConnection(a), RpcConnection(b, handlers.registry())
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        await nursery.start(server.run)
        with trio.fail_after(20):
            yield client, handlers
        nursery.cancel_scope.cancel()


async def test_call_and_tensor_round_trip(rpc_pair: tuple[RpcConnection, Handlers]) -> None:
    client, _ = rpc_pair
    assert await client.call("info", InfoRequest(), InfoResponse) == INFO
    h = torch.randn(1, 3, 8).to(torch.bfloat16)
    out = await client.call(
        "forward", ForwardRequest(h, torch.arange(3).view(1, 3), LayerRange(0, 1)), ForwardResponse
    )
    assert torch.equal(out.hidden_states, h * 2)


async def test_notify_runs_the_handler_and_nothing_answers(
    rpc_pair: tuple[RpcConnection, Handlers],
) -> None:
    client, handlers = rpc_pair
    with trio.fail_after(5):
        await client.notify("note", InfoRequest())
        await handlers.gate.wait()
        # failing, unknown and stream methods as notifies: dropped on the peer, channel fine
        await client.notify("fail", InfoRequest())
        await client.notify("nope", InfoRequest())
        assert await client.call("info", InfoRequest(), InfoResponse) == INFO
    assert handlers.noted == 1
    assert client.statistics().pending_calls == 0


async def test_a_one_way_handler_that_never_waits_runs_in_the_reader_task() -> None:
    """`OneWay.bind_now`: each notify's handler runs as it arrives, in the connection's
    reader task (no task of its own), in arrival order; one that fails is logged and
    dropped, and the channel stays usable."""
    seen: list[tuple[int, str]] = []

    def rpc_note(request: PushRequest, ctx: CallContext) -> None:
        seen.append((request.step, trio.lowlevel.current_task().name))
        if request.step == 1:
            raise ShardError("step 1 is refused")

    handlers = Handlers()
    registry = handlers.registry().with_bindings(
        [OneWay("note_now", PushRequest).bind_now(rpc_note)]
    )
    a, b = await channel_pair()
    client, server = RpcConnection(a), RpcConnection(b, registry)
    hidden, positions = torch.zeros(1, 1, 4), torch.zeros(1, 1, dtype=torch.int64)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        await nursery.start(server.run)
        with trio.fail_after(5):
            for step in range(3):
                await client.notify("note_now", PushRequest(b"s", step, hidden, positions))
            assert await client.call("info", InfoRequest(), InfoResponse) == INFO
        nursery.cancel_scope.cancel()
    assert [step for step, _ in seen] == [0, 1, 2]
    assert {name for _, name in seen} == {"swarm.net.rpc.RpcConnection.run"}
    assert server.statistics().calls_served == 4


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="poll rules of Linux TCP")
async def test_notify_at_once_sends_only_what_cannot_wait() -> None:
    """`RpcConnection.notify_at_once` sends a small notify over a writable TCP channel
    from the caller's task, and returns False without sending (and without waiting) for
    a message over `AT_ONCE_MAX`, while another send waits on a full socket, and over a
    stream that is not a TCP socket. A caller cancelled already does not begin a message
    that would leave at once (no cancel scope shields it), and the channel stays usable."""
    seen: list[int] = []

    def rpc_note(request: PushRequest, ctx: CallContext) -> None:
        seen.append(request.step)

    registry = HandlerRegistry([OneWay("note_now", PushRequest).bind_now(rpc_note)])
    a, b = await channel_pair(*await tcp_stream_pair())
    client, server = RpcConnection(a), RpcConnection(b, registry)
    positions = torch.zeros(1, 1, dtype=torch.int64)
    small = PushRequest(b"s", 0, torch.zeros(1, 1, 8), positions)
    big = PushRequest(b"s", 1, torch.zeros(1, 1, AT_ONCE_MAX // 4), positions)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        with trio.fail_after(10):
            assert await client.notify_at_once("note_now", small, timeout=5)
            assert not await client.notify_at_once("note_now", big, timeout=5)
            with trio.CancelScope() as cancelled:  # a cancelled caller's send is not begun
                cancelled.cancel()
                await client.notify("note_now", replace(small, step=3))
            assert cancelled.cancelled_caught and not a.is_closed
            # the peer reads nothing yet: 16 MiB fill the kernel's buffers, a send waits
            sent, flooded = [0], trio.Event()

            async def flood() -> None:
                filler = PushRequest(b"s", 2, torch.zeros(1, 16, 256), torch.zeros(1, 16).long())
                for _ in range(1024):  # 16 KiB each
                    await client.notify("note_now", filler)
                    sent[0] += 1
                flooded.set()

            nursery.start_soon(flood)
            while True:  # until the flood stopped moving: its send waits for the peer
                before = sent[0]
                await trio.sleep(0.2)
                if sent[0] == before:
                    break
            assert 0 < sent[0] < 1024
            # (were it to wait, it would wait for the peer that reads nothing: fail_after)
            assert not await client.notify_at_once("note_now", small, timeout=5)
            await nursery.start(server.run)  # the peer reads: everything drains
            await flooded.wait()
            while len(seen) < 1025:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert seen[0] == 0 and 1 not in seen and 3 not in seen
    a2, b2 = await channel_pair()  # in-memory streams: never "at once"
    assert not a2.can_send_at_once(16) and not b2.can_send_at_once(16)


async def test_remote_errors_are_typed(rpc_pair: tuple[RpcConnection, Handlers]) -> None:
    client, _ = rpc_pair
    with pytest.raises(RemoteError) as info:
        await client.call("fail", InfoRequest(), InfoResponse)
    assert (info.value.code, info.value.message) == (
        ErrorCode.BAD_REQUEST,
        "layer 7 is not loaded",
    )
    with pytest.raises(LimitExceeded, match="too many sessions"):
        await client.call("busy", InfoRequest(), InfoResponse)
    with pytest.raises(RemoteError) as crash:  # an internal failure: a code, not our text
        await client.call("crash", InfoRequest(), InfoResponse)
    assert crash.value.code is ErrorCode.INTERNAL
    assert "KeyError" not in str(crash.value) and "oops" not in str(crash.value)
    with pytest.raises(RemoteError, match="unknown method"):
        await client.call("nope", InfoRequest(), InfoResponse)
    with pytest.raises(RemoteError, match=r"bad_request: request\.t: expected 'info_request'"):
        await client.call("info", INFO, InfoResponse)  # the wrong request type is refused
    assert await client.call("info", InfoRequest(), InfoResponse) == INFO


async def test_wrong_response_type_is_protocol_error(
    rpc_pair: tuple[RpcConnection, Handlers],
) -> None:
    from swarm.errors import ProtocolError

    client, _ = rpc_pair
    with pytest.raises(ProtocolError, match="expected 'info_response'"):
        await client.call("wrong", InfoRequest(), InfoResponse)


async def test_deadline_cancels_remote_and_channel_stays_usable(
    rpc_pair: tuple[RpcConnection, Handlers],
) -> None:
    client, handlers = rpc_pair
    with pytest.raises(DeadlineExceeded):
        await client.call("hang", InfoRequest(), InfoResponse, timeout=0.05)
    with trio.fail_after(5):
        while handlers.cancelled < 1:  # the callee got our cancel
            await trio.sleep(0.01)
    assert await client.call("info", InfoRequest(), InfoResponse) == INFO


async def test_caller_cancelled_mid_call_leaves_channel_usable(
    rpc_pair: tuple[RpcConnection, Handlers],
) -> None:
    client, _handlers = rpc_pair
    big = torch.randn(256, 1024)  # 1 MiB: the send is in flight when we cancel
    req = ForwardRequest(big, torch.zeros(1, 1, dtype=torch.int64), LayerRange(0, 1))
    for _ in range(3):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.call, "forward", req, ForwardResponse)
            nursery.start_soon(client.call, "hang", InfoRequest(), InfoResponse)
            await trio.sleep(0)
            nursery.cancel_scope.cancel()
    assert await client.call("info", InfoRequest(), InfoResponse) == INFO
    out = await client.call("forward", req, ForwardResponse)
    assert torch.equal(out.hidden_states, big * 2)
    assert client.statistics().pending_calls == 0


async def test_hundred_concurrent_calls(rpc_pair: tuple[RpcConnection, Handlers]) -> None:
    client, handlers = rpc_pair
    results: list[torch.Tensor] = []

    async def one(i: int) -> None:
        if i % 2:
            assert await client.call("wait", InfoRequest(), InfoResponse) == INFO
        else:
            h = torch.full((1, 1, 4), float(i))
            req = ForwardRequest(h, torch.zeros(1, 1, dtype=torch.int64), LayerRange(0, 1))
            out = await client.call("forward", req, ForwardResponse)
            assert torch.equal(out.hidden_states, h * 2)
            results.append(out.hidden_states)

    async with trio.open_nursery() as nursery:
        for i in range(100):
            nursery.start_soon(one, i)
        with trio.fail_after(10):
            while len(results) < 50:  # the even calls finish while the odd ones still wait
                await trio.sleep(0.01)
        assert client.statistics().pending_calls == 50
        handlers.gate.set()
    assert client.statistics().pending_calls == 0


async def test_bidirectional_stream(rpc_pair: tuple[RpcConnection, Handlers]) -> None:
    client, _ = rpc_pair
    pos = torch.zeros(1, 1, dtype=torch.int64)
    async with client.open_stream("steps", timeout=5) as stream:
        for i in range(5):
            await stream.send(InferenceInput(i, torch.full((1, 1, 4), float(i)), pos))
            result = await stream.receive(InferenceStepResult)
            assert result.step == i
            assert torch.equal(result.hidden_states, torch.full((1, 1, 4), i + 1.0))
        await stream.send_end()
        with pytest.raises(trio.EndOfChannel):
            await stream.receive()


async def test_stream_remote_error_and_deadline(rpc_pair: tuple[RpcConnection, Handlers]) -> None:
    client, _ = rpc_pair
    async with client.open_stream("bad_stream", timeout=5) as stream:
        await stream.send(InfoRequest())
        with pytest.raises(RemoteError, match="cache lost"):
            await stream.receive()
    async with client.open_stream("steps", timeout=0.05) as stream:
        with pytest.raises(DeadlineExceeded):
            await stream.receive()
    assert await client.call("info", InfoRequest(), InfoResponse) == INFO


async def test_closed_channel_fails_waiting_calls(rpc_pair: tuple[RpcConnection, Handlers]) -> None:
    client, _ = rpc_pair
    async with trio.open_nursery() as nursery:

        async def waiter() -> None:
            with pytest.raises(ConnectionClosed):
                await client.call("hang", InfoRequest(), InfoResponse)

        nursery.start_soon(waiter)
        await trio.sleep(0.01)
        await client.aclose()
    with pytest.raises(ConnectionClosed):
        await client.call("info", InfoRequest(), InfoResponse)


async def _serve(nursery: trio.Nursery, swarm_key: bytes | None = None) -> tuple[RpcServer, int]:
    server = RpcServer(BOB, Handlers().registry(), swarm_key=swarm_key)
    port = await nursery.start(server.serve, "127.0.0.1", 0)
    return server, port


async def test_pool_reuses_and_redials_broken_channels() -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            _server, port = await _serve(nursery)
            async with open_connection_pool(ALICE) as pool:
                for _ in range(3):
                    info = await call_info(await pool.get("127.0.0.1", port, BOB.peer_id))
                    assert info == INFO
                assert pool.statistics() == PoolStatistics(connections=1, dials=1)
                conn = await pool.get("127.0.0.1", port, BOB.peer_id)
                await conn.aclose()  # break it
                assert await call_info(await pool.get("127.0.0.1", port, BOB.peer_id)) == INFO
                assert pool.statistics().dials == 2
                assert pool.statistics().connections == 1
                await _concurrent_gets_share_one_dial(pool, port)
                with pytest.raises(PeerIdMismatch):
                    await pool.get("127.0.0.1", port, ALICE.peer_id)
            nursery.cancel_scope.cancel()


async def _concurrent_gets_share_one_dial(pool: ConnectionPool, port: int) -> None:
    before = pool.dials
    conns: list[RpcConnection] = []

    async def get() -> None:
        conns.append(await pool.get("127.0.0.1", port))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(get)
    assert pool.dials == before + 1
    assert len({id(c) for c in conns}) == 1


async def test_pool_with_swarm_key() -> None:
    key = b"K" * 32
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            server, port = await _serve(nursery, swarm_key=key)
            async with open_connection_pool(ALICE, swarm_key=key) as pool:
                assert await call_info(await pool.get("127.0.0.1", port)) == INFO
            from swarm.errors import SwarmKeyMismatch

            async with open_connection_pool(ALICE, config=NetConfig()) as pool:
                with pytest.raises(SwarmKeyMismatch):
                    await pool.get("127.0.0.1", port)
            async with open_connection_pool(ALICE, swarm_key=b"X" * 32) as pool:
                with pytest.raises(SwarmKeyMismatch):
                    await pool.get("127.0.0.1", port)
            with trio.fail_after(5):
                while server.handshake_failures < 2:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()


async def test_garbage_envelope_closes_only_that_channel() -> None:
    handlers = Handlers()
    a, b = await channel_pair()
    server = RpcConnection(b, handlers.registry())
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        await a.send(b"\xc1 not msgpack")
        with trio.fail_after(5), pytest.raises(ConnectionClosed):
            await a.receive()
        nursery.cancel_scope.cancel()
    assert server.is_closed


class CountingTransport:
    """A transport wrapper, as the link emulator in swarm.testing will be."""

    def __init__(self) -> None:
        self.inner = TCPTransport()
        self.connects = 0
        self.accepted = 0

    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        self.connects += 1
        return await self.inner.connect(host, port)

    async def serve(
        self,
        handler: Callable[[trio.abc.Stream], Awaitable[None]],
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async def counted(stream: trio.abc.Stream) -> None:
            self.accepted += 1
            await handler(stream)

        await self.inner.serve(counted, host, port, task_status=task_status)


async def test_transport_seam_is_used_by_server_and_pool() -> None:
    transport = CountingTransport()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            server = RpcServer(BOB, Handlers().registry(), transport=transport)
            port = await nursery.start(server.serve, "127.0.0.1", 0)
            async with open_connection_pool(ALICE, transport=transport) as pool:
                info = await call_info(await pool.get("127.0.0.1", port))
                assert info == INFO
            assert (transport.connects, transport.accepted) == (1, 1)
            nursery.cancel_scope.cancel()


async def test_calls_cancelled_as_their_channel_closes_end_quietly() -> None:
    # a server stopping: its calls (pings) are cancelled while their channels close; a call
    # whose cancellation came after the connection's nursery closed tried to tell the peer
    # from that nursery and raised "Nursery is closed to new arrivals" (seen in a full run).
    # Trio runs woken tasks in a random order, so many rounds meet the window.
    async def call(client: RpcConnection) -> None:
        with contextlib.suppress(ConnectionClosed):  # the channel went first: a fair answer
            await client.call("hang", InfoRequest(), InfoResponse)

    for _ in range(200):
        handlers = Handlers()
        a, b = await channel_pair()
        client, server = RpcConnection(a), RpcConnection(b, handlers.registry())
        with trio.fail_after(10):
            async with trio.open_nursery() as outer:
                await outer.start(server.run)
                async with trio.open_nursery() as inner:
                    await inner.start(client.run)
                    for _ in range(3):
                        inner.start_soon(call, client)
                    await trio.sleep(0)
                    await trio.sleep(0)
                    inner.cancel_scope.cancel()  # the run and its calls, together
                outer.cancel_scope.cancel()
