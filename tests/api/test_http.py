"""The gateway's HTTP layer (`swarm.api.http.serve_http`) on a real loopback socket, port 0,
under trio's virtual clock (no process, no real wait): the header deadline, the connection
cap and the room a full gate makes for a host holding fewer, and the send budget that a
trickling reader spends."""

from __future__ import annotations

import functools
from typing import Any

import trio
import trio.testing
from hypercorn.config import Config as HypercornConfig

from swarm.api.http import ConnectionGate, HttpLimits, OpenConnection, answering_request, serve_http

HEADER_TIMEOUT_S = 2.0
KEEP_ALIVE_S = 75.0
SEND_TIMEOUT_S = 30.0
SEND_BUDGET_S = 5.0
CHUNK = 1 << 18  # bytes per streamed piece: far more than the socket buffers hold


class _App:
    """``GET /`` answers "ok"; ``GET /stream`` streams CHUNK-byte pieces until the client
    disconnects (`disconnected` is then set), as a generation would."""

    def __init__(self) -> None:
        self.disconnected = trio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["path"] != "/stream":
            headers = [(b"content-length", b"2")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch, receive, nursery.cancel_scope)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            while True:
                await send({"type": "http.response.body", "body": b"x" * CHUNK, "more_body": True})

    async def _watch(self, receive: Any, scope: trio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.disconnected.set()
        scope.cancel()


async def _serve(nursery: trio.Nursery, gate: ConnectionGate, app: Any = None) -> int:
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.keep_alive_timeout = KEEP_ALIVE_S
    limits = HttpLimits(SEND_TIMEOUT_S, SEND_BUDGET_S, HEADER_TIMEOUT_S)
    binds = await nursery.start(functools.partial(serve_http, app or _App(), config, gate, limits))
    return int(binds[0].rsplit(":", 1)[1])


async def _closed_within(stream: trio.SocketStream, seconds: float) -> bool:
    """Whether the server closes ``stream`` within ``seconds`` (reading what it sends)."""
    with trio.move_on_after(seconds):
        while True:
            try:
                if await stream.receive_some(4096) == b"":
                    return True
            except trio.BrokenResourceError:
                return True
    return False


async def test_a_trickling_head_is_cut_at_the_header_deadline_not_the_keep_alive(
    mock_clock: trio.testing.MockClock,
) -> None:
    mock_clock.autojump_threshold = 0.02  # loopback bytes land long before that
    gate = ConnectionGate(total=8, per_host=8)
    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, gate)
        # a whole request is answered; its connection then idles in keep-alive
        kept = await trio.open_tcp_stream("127.0.0.1", port)
        await kept.send_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        answer = b""
        with trio.fail_after(5):
            while not answer.endswith(b"ok"):
                answer += await kept.receive_some(4096)
        assert answer.startswith(b"HTTP/1.1 200")
        # a head that trickles in, a byte every second (never silent for long)
        slow = await trio.open_tcp_stream("127.0.0.1", port)
        start = trio.current_time()
        await slow.send_all(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        closed_at = None
        for _ in range(30):
            if await _closed_within(slow, 1.0):
                closed_at = trio.current_time()
                break
            try:
                await slow.send_all(b"a")
            except trio.BrokenResourceError:
                closed_at = trio.current_time()
                break
        assert closed_at is not None, "a trickling head held its connection for 30 s"
        assert closed_at - start <= HEADER_TIMEOUT_S + 1.0  # virtual seconds
        assert gate.statistics().header_timeouts == 1
        # the silent kept-alive connection is no head: Hypercorn's keep-alive ends it
        assert not await _closed_within(kept, 1.0)
        assert await _closed_within(kept, KEEP_ALIVE_S)
        assert gate.statistics().header_timeouts == 1
        nursery.cancel_scope.cancel()


async def test_connections_past_the_cap_are_closed_at_once(
    mock_clock: trio.testing.MockClock,
) -> None:
    mock_clock.autojump_threshold = 0.02
    gate = ConnectionGate(total=3, per_host=2)
    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, gate)
        held = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
        extra = await trio.open_tcp_stream("127.0.0.1", port)
        assert await _closed_within(extra, 1.0)  # past the host's cap
        assert not any([await _closed_within(s, 1.0) for s in held])
        assert gate.statistics().open == 2 and gate.statistics().refused == 1
        for stream in held:
            await stream.aclose()
        nursery.cancel_scope.cancel()


class _HoldingApp(_App):
    """Also ``GET /hold``: an answer begun and held open, marked as answering (as the
    gateway's middleware marks every request whose body is whole), until the client leaves;
    a POST's body is read whole before it is answered."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":  # the body first, whole
            while (await receive()).get("more_body"):
                pass
        if scope["type"] != "http" or scope["path"] != "/hold":
            await super().__call__(scope, receive, send)
            return
        with answering_request():
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"h", "more_body": True})
            while (await receive())["type"] != "http.disconnect":
                pass


async def _get_ok(stream: trio.SocketStream) -> bool:
    """Whether ``GET /`` on ``stream`` is answered "ok"."""
    await stream.send_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    data = b""
    with trio.move_on_after(5):
        while not data.endswith(b"ok"):
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            data += chunk
    return data.startswith(b"HTTP/1.1 200") and data.endswith(b"ok")


async def test_a_full_gate_makes_room_for_a_host_holding_fewer(
    mock_clock: trio.testing.MockClock,
) -> None:
    mock_clock.autojump_threshold = 0.02
    gate = ConnectionGate(total=4, per_host=4)
    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, gate, _HoldingApp())
        held = await trio.open_tcp_stream("127.0.0.1", port)  # oldest, but being answered
        await held.send_all(b"GET /hold HTTP/1.1\r\nHost: t\r\n\r\n")
        assert await held.receive_some(4096)
        idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(3)]
        assert await _get_ok(idle[1])  # a kept-alive connection between requests
        await idle[2].send_all(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 9\r\n\r\n{")
        await trio.sleep(0.5)
        assert gate.statistics().open == 4
        # the total is full: a newcomer from another host takes the oldest idle one's place
        newcomer = await trio.open_tcp_stream("127.0.0.1", port, local_address="127.0.0.2")
        assert await _get_ok(newcomer)
        assert await _closed_within(idle[0], 1.0)
        assert not any([await _closed_within(s, 1.0) for s in (held, idle[1], idle[2])])
        # 127.0.0.1 holds 3: another from 127.0.0.2 (holding 1) makes room again, then the
        # shares are 2 and 2 and a third from 127.0.0.2 is refused, as is one from 127.0.0.1
        second = await trio.open_tcp_stream("127.0.0.1", port, local_address="127.0.0.2")
        assert await _get_ok(second)
        assert await _closed_within(idle[1], 1.0)  # the next oldest not being answered
        third = await trio.open_tcp_stream("127.0.0.1", port, local_address="127.0.0.2")
        assert await _closed_within(third, 1.0)
        again = await trio.open_tcp_stream("127.0.0.1", port)
        assert await _closed_within(again, 1.0)
        assert not await _closed_within(held, 1.0)  # an answer in progress is never closed
        statistics = gate.statistics()
        assert (statistics.open, statistics.evicted, statistics.refused) == (4, 2, 2)
        for stream in (held, idle[2], newcomer, second):
            await stream.aclose()
        nursery.cancel_scope.cancel()


def test_hosts_with_equal_shares_are_never_closed_for_a_newcomer() -> None:
    closed: list[str] = []
    gate = ConnectionGate(total=3, per_host=8)
    for host in ("a", "b", "c"):
        assert gate.enter(OpenConnection(host, lambda h=host: closed.append(h)))
    assert not gate.enter(OpenConnection("d", lambda: closed.append("d")))
    assert gate.enter(OpenConnection("c", lambda: closed.append("c2"))) is False
    assert closed == [] and gate.statistics().refused == 2
    # one host holding two more than the newcomer gives up its oldest connection
    gate = ConnectionGate(total=4, per_host=8)
    connections = [OpenConnection(h, lambda h=h: closed.append(h)) for h in "aaab"]
    for connection in connections:
        assert gate.enter(connection)
    assert gate.enter(OpenConnection("b", lambda: closed.append("b2")))
    assert closed == ["a"]
    gate.leave(connections[0])  # its handler counts it out later: nothing more happens
    assert gate.statistics().open == 4 and gate.statistics().evicted == 1


async def test_a_trickling_reader_spends_its_send_budget_and_loses_the_stream(
    mock_clock: trio.testing.MockClock,
) -> None:
    # it reads 64 KiB a second: every write completes well within SEND_TIMEOUT_S, yet the
    # stream waits on it, and after SEND_BUDGET_S of such waits in all the connection ends
    mock_clock.autojump_threshold = 0.02
    gate, app = ConnectionGate(total=8, per_host=8), _App()
    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, gate, app)
        reader = await trio.open_tcp_stream("127.0.0.1", port)
        await reader.send_all(b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n")
        received, closed = 0, False
        for _ in range(120):
            with trio.move_on_after(1.0):
                await trio.sleep_forever()
            try:
                data = await reader.receive_some(1 << 16)
            except trio.BrokenResourceError:
                data = b""
            if not data:
                closed = True
                break
            received += len(data)
        assert closed, "a trickling reader kept its stream for 120 s"
        assert received > CHUNK  # it did read: no single write stalled past its deadline
        with trio.fail_after(5):
            await app.disconnected.wait()  # the application saw it go: its slot is freed
        assert gate.statistics().send_timeouts == 1
        nursery.cancel_scope.cancel()


async def test_a_reader_that_keeps_up_never_spends_the_budget(
    mock_clock: trio.testing.MockClock,
) -> None:
    mock_clock.autojump_threshold = 0.02
    gate, app = ConnectionGate(total=8, per_host=8), _App()
    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, gate, app)
        reader = await trio.open_tcp_stream("127.0.0.1", port)
        await reader.send_all(b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n")
        received = 0
        with trio.fail_after(30):
            while received < 40 * CHUNK:  # what a trickle would take 160 s to read
                data = await reader.receive_some(1 << 20)
                assert data, "a reader that keeps up lost its stream"
                received += len(data)
        assert gate.statistics().send_timeouts == 0 and not app.disconnected.is_set()
        await reader.aclose()
        nursery.cancel_scope.cancel()
