"""`serve_http`: Hypercorn's HTTP protocols on trio, with limits per connection.

Hypercorn's own trio server accepts every connection and sends every byte with
cancellation shielded and no deadline: a client that stops reading holds the sending task,
and with it the generation and its admission slot, for as long as the connection lives;
1,100 half-sent requests filled the process's file table. This module serves the same
protocol code (`hypercorn.protocol`) through its own connection handler:

- a connection cap, in all and per host (`ConnectionGate`): a connection past its host's
  cap is closed as soon as it is accepted, so one host cannot take the file table. When the
  total is full, a newcomer takes the place of the oldest connection that is not being
  answered (idle, or its head or body still arriving) of the host holding the most, if that
  host holds at least two more than the newcomer's; otherwise it is closed. So a few hosts'
  half-sent requests cannot shut out everyone else until their deadlines pass, and hosts
  with one connection each are never closed for another's sake (max-min fair shares);
- a send deadline: a write that cannot complete within ``send_timeout_s`` (the client's
  receive window stayed shut) closes the connection. The application then sees
  ``http.disconnect``, so a generation in flight is cancelled and its slot freed;
- a send budget per request: a client that reads just fast enough to finish every write
  within its deadline still paces the generation and holds its slot; once the writes of one
  request have waited ``send_budget_s`` in all (each beyond a scheduling slack of
  ``SEND_SLACK_S``), the connection is closed the same way. A reader that keeps up never
  waits, so it never spends the budget; only a client slower than the swarm does;
- a header deadline (nginx's ``client_header_timeout``): once the first byte of a request
  head arrives, the whole head must follow within ``header_timeout_s``, or the connection is
  closed (Hypercorn's keep-alive timer alone let a head trickle in for its whole 75 s);
- a connection the client closed ends at once (Hypercorn's keeps its keep-alive timer, and
  with it the socket, for the whole keep-alive time after the peer is gone).

An idle connection that sends nothing is closed by Hypercorn's keep-alive timer
(``keep_alive_timeout``, which runs until a whole head arrived), and the gateway's
middleware bounds the time a body may take. Hypercorn's ``read_timeout`` would also end long
streams whose client rightly sends nothing, so it stays unset. (Bytes of a pipelined next
head that arrived with the previous request are left to the keep-alive timer.)

Built on Hypercorn's `TCPServer`, `Lifespan` and `WorkerContext` (checked with 0.17-0.18).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import repr_socket_addr, wrap_app

from swarm.net.transport import host_key

__all__ = [
    "ConnectionGate",
    "ConnectionStatistics",
    "HttpLimits",
    "OpenConnection",
    "answering_request",
    "serve_http",
]

SEND_SLACK_S = 0.05  # a write's wait up to this long is scheduling, not a slow client


@dataclass(frozen=True)
class HttpLimits:
    """The deadlines of one connection (seconds; `swarm.api.config.GatewayConfig` documents
    the defaults): one write's, the writes of one request's in all, and a request head's
    from its first byte."""

    send_timeout_s: float = 30.0
    send_budget_s: float = 60.0
    header_timeout_s: float = 10.0


@dataclass(frozen=True)
class ConnectionStatistics:
    open: int
    hosts: int
    refused: int  # connections closed at once: over the host's cap, or no room to be made
    send_timeouts: int  # connections closed because the client did not read (fast enough)
    header_timeouts: int  # connections closed because a request head took too long
    evicted: int  # connections closed to make room for a host holding fewer


class OpenConnection:
    """What the gate knows of one connection: its host, and how many of its requests are
    being answered (body read whole, answer not finished). Only a connection answering
    nothing may be closed to make room; ``close`` asks its handler to close it."""

    def __init__(self, host: str, close: Callable[[], None]) -> None:
        self.host = host
        self.answering = 0
        self.close = close


_CURRENT: ContextVar[OpenConnection | None] = ContextVar("swarm_api_connection", default=None)


@contextlib.contextmanager
def answering_request() -> Iterator[None]:
    """Mark the current connection (if served by `serve_http`) as answering a request for
    the duration: the gate then does not close it to make room for others."""
    connection = _CURRENT.get()
    if connection is not None:
        connection.answering += 1
    try:
        yield
    finally:
        if connection is not None:
            connection.answering -= 1


class ConnectionGate:
    """Counts open connections in all and per host: refuses past ``per_host``, and past
    ``total`` makes room by closing another host's idle connection where that is fair (see
    the module docstring)."""

    def __init__(self, total: int, per_host: int) -> None:
        self.total = total
        self.per_host = per_host
        self._open: Counter[str] = Counter()
        self._held: dict[str, list[OpenConnection]] = {}  # per host, oldest first
        self._count = 0
        self._refused = 0
        self._evicted = 0
        self.send_timeouts = 0
        self.header_timeouts = 0

    def enter(self, connection: OpenConnection) -> bool:
        """Count ``connection`` in; False (and nothing counted) past a cap with no room to
        be made."""
        host = connection.host
        if self._open[host] >= self.per_host or (
            self._count >= self.total and not self._make_room(host)
        ):
            self._refused += 1
            return False
        self._count += 1
        self._open[host] += 1
        self._held.setdefault(host, []).append(connection)
        return True

    def leave(self, connection: OpenConnection) -> None:
        """Count ``connection`` out (nothing if it was already closed to make room)."""
        held = self._held.get(connection.host, [])
        if connection in held:
            held.remove(connection)
            self._count -= 1
            self._open[connection.host] -= 1
            if self._open[connection.host] <= 0:
                del self._open[connection.host]
                del self._held[connection.host]

    def _make_room(self, newcomer: str) -> bool:
        """Close the oldest connection answering nothing of the host holding the most (at
        least two more than ``newcomer``); False if there is none."""
        mine = self._open[newcomer]
        for host, count in self._open.most_common():
            if count < mine + 2:
                return False
            victim = next((c for c in self._held[host] if c.answering == 0), None)
            if victim is not None:
                self.leave(victim)
                self._evicted += 1
                victim.close()
                return True
        return False

    def statistics(self) -> ConnectionStatistics:
        return ConnectionStatistics(
            self._count,
            len(self._open),
            self._refused,
            self.send_timeouts,
            self.header_timeouts,
            self._evicted,
        )


class _GuardedTCPServer(TCPServer):
    """Hypercorn's connection handler with the gate, the send and the header deadlines."""

    def __init__(
        self,
        gate: ConnectionGate,
        limits: HttpLimits,
        app: Any,
        config: HypercornConfig,
        context: WorkerContext,
        state: ConnectionState,
        stream: trio.SocketStream,
    ) -> None:
        super().__init__(app, config, context, state, stream)  # type: ignore[arg-type]
        self._gate = gate
        self._limits = limits
        self._send_waited = 0.0  # seconds the writes of this request waited (beyond slack)
        self._awaiting_head = True  # no request in progress: the next bytes start a head
        self._head_timer = trio.CancelScope(deadline=math.inf)  # armed by a head's first byte
        self._evict = trio.Event()  # set by the gate to make room for another host

    async def run(self) -> None:
        try:
            host = host_key(str(self.stream.socket.getpeername()[0]))
        except (OSError, AttributeError, IndexError):
            host = "?"
        connection = OpenConnection(host, self._evict.set)
        if not self._gate.enter(connection):
            with trio.CancelScope(shield=True):
                await self.stream.aclose()
            return
        _CURRENT.set(connection)  # this task's context, copied into the app's tasks
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_head)
                nursery.start_soon(self._watch_eviction)
                await super().run()
                nursery.cancel_scope.cancel()
        finally:
            self._gate.leave(connection)

    async def _watch_eviction(self) -> None:
        """Close the connection when the gate closes it to make room."""
        await self._evict.wait()
        with trio.CancelScope(shield=True):
            await self.stream.aclose()  # ends the read loop, and with it the connection

    async def _watch_head(self) -> None:
        """Close the connection when ``_head_timer``'s deadline passes (a head begun but not
        complete within ``limits.header_timeout_s``)."""
        with self._head_timer:
            await trio.sleep_forever()
        self._gate.header_timeouts += 1
        with trio.CancelScope(shield=True):
            await self.stream.aclose()  # ends the read loop, and with it the connection

    async def _read_data(self) -> None:
        # Hypercorn's loop (0.17-0.18), plus the header deadline's start.
        while True:
            try:
                with trio.fail_after(self.config.read_timeout or math.inf):
                    data = await self.stream.receive_some(MAX_RECV)
            except (trio.ClosedResourceError, trio.BrokenResourceError, trio.TooSlowError):
                break
            if data and self._awaiting_head and self._head_timer.deadline == math.inf:
                self._head_timer.deadline = trio.current_time() + self._limits.header_timeout_s
            await self.protocol.handle(RawData(bytes(data)))
            if data == b"":
                break
        await self.protocol.handle(Closed())
        # The peer closed (or the stream broke): stop the keep-alive timer now. Hypercorn's
        # own handler leaves it running, so a closed connection held its task, its socket
        # and here its place under the caps for the whole keep-alive time (75 s).
        await self.idle_task.stop()

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, Updated):  # idle: between requests; not idle: a head is whole
            self._awaiting_head = event.idle
            self._head_timer.deadline = math.inf
            if not event.idle:
                self._send_waited = 0.0  # a new request: a new send budget
        if not isinstance(event, RawData):
            await super().protocol_send(event)
            return
        async with self.send_lock:
            stalled = False
            try:
                # shielded from outside cancellation (a half-sent frame would corrupt the
                # stream) but not from its own deadline
                limits, start = self._limits, trio.current_time()
                budget = limits.send_budget_s - self._send_waited + SEND_SLACK_S
                with trio.CancelScope(shield=True) as scope:
                    scope.deadline = start + min(limits.send_timeout_s, budget)
                    await self.stream.send_all(event.data)
                stalled = scope.cancelled_caught
                self._send_waited += max(0.0, trio.current_time() - start - SEND_SLACK_S)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            else:
                if not stalled:
                    return
                self._gate.send_timeouts += 1
            with trio.CancelScope(shield=True):
                await self.stream.aclose()  # also ends the read loop
            await self.protocol.handle(Closed())


async def serve_http(
    app: Callable[..., Awaitable[None]],
    config: HypercornConfig,
    gate: ConnectionGate,
    limits: HttpLimits,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the ASGI ``app`` on ``config.bind`` until cancelled; ``task_status`` gets the
    bound URLs. Plain HTTP only (HTTP/1.1, and HTTP/2 by prior knowledge or upgrade).

    ``gate`` caps the connections; ``limits`` bounds each write, the writes of each request
    in all, and each request head."""
    wrapped = wrap_app(app, config.wsgi_max_body_size, "asgi")  # type: ignore[arg-type]
    lifespan_state: dict[str, Any] = {}
    lifespan = Lifespan(wrapped, config, lifespan_state)
    context = WorkerContext(None)
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        try:
            async with trio.open_nursery() as server_nursery:
                sockets = config.create_sockets()
                listeners, binds = [], []
                for sock in sockets.insecure_sockets:
                    sock.listen(config.backlog)
                    listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
                    binds.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
                handler = functools.partial(
                    _GuardedTCPServer,
                    gate,
                    limits,
                    wrapped,
                    config,
                    context,
                    ConnectionState(lifespan_state.copy()),
                )
                await server_nursery.start(
                    functools.partial(
                        trio.serve_listeners, handler, listeners, handler_nursery=server_nursery
                    )
                )
                task_status.started(binds)
                await trio.sleep_forever()
        finally:
            await context.terminated.set()
            with trio.CancelScope(shield=True):
                with trio.move_on_after(config.graceful_timeout):
                    try:
                        await lifespan.wait_for_shutdown()
                    except trio.ClosedResourceError:
                        pass  # cancelled from outside: the lifespan task has ended already
            lifespan_nursery.cancel_scope.cancel()
