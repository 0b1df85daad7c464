"""RPC over one `SecureChannel`: request/response calls and bidirectional streams.

Both ends of a channel are symmetric: each may call the other. Every message on the channel
is a msgpack array ``[kind, call_id, method, body]``; ``call_id`` is chosen by the caller and
names the call in both directions (caller and callee kinds differ, so the two id spaces never
mix). ``body`` is a `Message` map (see `swarm.net.messages`) or nil.

Handlers are found in a `HandlerRegistry` (`swarm.net.methods`), built from the rows that
declare each method: a unary or one-way handler takes ``(request, ctx)``, a stream handler
``(stream, ctx)`` and talks through a `TypedStream`. The methods here take a method's name;
callers use the typed rows and stubs (`swarm.net.surface`) instead. Exceptions raised by a
handler reach the caller as `RemoteError` (an `ErrorCode` and a safe message;
`LimitExceeded` for a remote ``LimitExceeded``): `swarm.net.envelope` is that boundary.

Every call has a deadline (``NetConfig.call_timeout`` unless given): `DeadlineExceeded`. A
caller that is cancelled or times out sends a cancel to the callee and leaves the channel
usable: a message is never cut in half (a send that may wait is shielded; one that leaves
at once is not begun by a caller cancelled already).
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import msgpack
import trio

from swarm.errors import (
    ConnectionClosed,
    DeadlineExceeded,
    ErrorCode,
    LimitExceeded,
    ProtocolError,
    RemoteError,
    SwarmError,
)
from swarm.net.channel import SecureChannel
from swarm.net.config import DEFAULT_NET_CONFIG, NetConfig
from swarm.net.envelope import (
    FROM_CALLER,
    Kind,
    error_body,
    error_code,
    parse_envelope,
    remote_error,
)
from swarm.net.messages import Message, message_from_wire
from swarm.net.methods import Binding, HandlerRegistry, Shape, TypedStream
from swarm.types import PeerId

__all__ = ["CallContext", "RpcConnection", "RpcStatistics", "RpcStream"]

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class RpcStatistics:
    pending_calls: int  # our unary calls waiting for answers
    open_streams: int  # our streams open
    serving: int  # the peer's calls our handlers run now
    calls_made: int
    calls_served: int


@dataclass(frozen=True)
class CallContext:
    """What a handler knows about the call: the authenticated caller, the method, and the
    caller's IP address as the socket saw it (None when the transport has none);
    ``via_relay``: the channel reached us through a relay that named the caller's address
    (``peer_host`` is then that address, as the relay saw it)."""

    peer_id: PeerId
    method: str
    peer_host: str | None = None
    via_relay: bool = False


class _Pending:
    """A caller's unary call waiting for its answer."""

    __slots__ = ("body", "error", "event")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.body: Any = None
        self.error: BaseException | None = None


class RpcStream:
    """One side of a bidirectional message stream.

    `receive` raises `trio.EndOfChannel` once the other side ended the stream cleanly,
    `RemoteError` if the remote handler failed, `DeadlineExceeded` after ``timeout``
    (default: the stream's). Iterate with ``async for``.
    """

    def __init__(
        self, conn: RpcConnection, call_id: int, caller: bool, timeout: float, buffer: int
    ) -> None:
        self._conn = conn
        self.call_id = call_id
        self._caller = caller
        self.timeout = timeout
        self._inbox_send, self._inbox = trio.open_memory_channel[tuple[str, Any]](buffer)
        self.finished = False  # the remote side ended, failed, or we cancelled
        self._wake: Callable[[], None] | None = None  # `on_arrival`

    async def send(self, msg: Message) -> None:
        """Send one message. Raises `ConnectionClosed` if the channel is gone."""
        kind = Kind.C_DATA if self._caller else Kind.S_DATA
        await self._conn._send([kind, self.call_id, None, msg.to_wire()])

    async def send_end(self) -> None:
        """Tell the other side we will send nothing more (it sees `trio.EndOfChannel`)."""
        kind = Kind.C_END if self._caller else Kind.S_END
        await self._conn._send([kind, self.call_id, None, None])

    async def receive(self, expect: type[M] | None = None, timeout: float | None = None) -> Any:
        """The next message from the other side (checked against ``expect`` if given)."""
        seconds = self.timeout if timeout is None else timeout
        try:
            if seconds == math.inf:  # a handler's stream: no deadline, no cancel scope
                what, body = await self._inbox.receive()
            else:
                with trio.move_on_after(seconds) as scope:
                    what, body = await self._inbox.receive()
                if scope.cancelled_caught:
                    raise DeadlineExceeded(f"stream {self.call_id}: no message within the deadline")
        except trio.EndOfChannel:
            self.finished = True
            raise
        return self._open(what, body, expect)

    def receive_nowait(self, expect: type[M] | None = None) -> Any:
        """The next message if one has arrived, as `receive` gives it (and raises what it
        raises); `trio.WouldBlock` if none has. Never waits."""
        try:
            what, body = self._inbox.receive_nowait()
        except trio.EndOfChannel:
            self.finished = True
            raise
        return self._open(what, body, expect)

    def on_arrival(self, wake: Callable[[], None] | None) -> None:
        """Call ``wake`` whenever a message, the end or an error arrives (None: stop): for
        a receiver that waits on more than this stream and takes what arrived with
        `receive_nowait`. It runs in the connection's reader task and must not wait."""
        self._wake = wake

    def _open(self, what: str, body: Any, expect: type[M] | None) -> Any:
        if what == "error":
            self.finished = True
            raise body
        return message_from_wire(body, "stream.body", expect=expect)

    def __aiter__(self) -> RpcStream:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def _deliver(self, what: str, body: Any) -> bool:
        try:
            self._inbox_send.send_nowait((what, body))
        except trio.WouldBlock:
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return True
        if self._wake is not None:
            self._wake()
        return True

    def _end(self) -> None:
        self._inbox_send.close()
        if self._wake is not None:
            self._wake()


class RpcConnection:
    """Calls in both directions over one channel. Run it with ``await nursery.start(conn.run)``;
    it stops when the channel closes, failing waiting calls with `ConnectionClosed`."""

    def __init__(
        self,
        channel: SecureChannel,
        handlers: HandlerRegistry | None = None,
        config: NetConfig = DEFAULT_NET_CONFIG,
        remote_host: str | None = None,
        via_relay: bool = False,
    ) -> None:
        self.channel = channel
        self.remote_peer_id = channel.remote_peer_id
        self.remote_host = remote_host
        self.via_relay = via_relay  # see `CallContext.via_relay`
        self._handlers = handlers
        self._config = config
        self._next_id = 0
        self._pending: dict[int, _Pending] = {}
        self._streams: dict[int, RpcStream] = {}  # our outgoing streams
        self._serving: dict[int, tuple[trio.CancelScope, RpcStream | None]] = {}
        self._nursery: trio.Nursery | None = None
        self._closed = False
        self.calls_made = 0
        self.calls_served = 0

    @property
    def is_closed(self) -> bool:
        return self._closed or self.channel.is_closed

    @property
    def busy(self) -> bool:
        """A call or stream is in flight on the channel, in either direction."""
        return bool(self._pending or self._streams or self._serving)

    def statistics(self) -> RpcStatistics:
        return RpcStatistics(
            pending_calls=len(self._pending),
            open_streams=len(self._streams),
            serving=len(self._serving),
            calls_made=self.calls_made,
            calls_served=self.calls_served,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read and dispatch until the channel closes. Runs handler tasks in its own nursery."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                try:
                    await self._read_loop()
                finally:
                    # nothing new starts here from now on: the nursery closes once its
                    # tasks end, and a call cancelled after that must not try to tell the
                    # peer from it (trio refuses, and the channel is going anyway)
                    self._nursery = None
                nursery.cancel_scope.cancel()
        finally:
            self._shutdown(ConnectionClosed(f"channel to {self.remote_peer_id} closed"))
            with trio.CancelScope(shield=True):
                await self.channel.aclose()

    async def aclose(self) -> None:
        """Close the channel; `run` returns and waiting calls fail with `ConnectionClosed`."""
        self._closed = True
        await self.channel.aclose()

    # ---- caller side ----

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def call(
        self, method: str, request: Message, expect: type[M], *, timeout: float | None = None
    ) -> M:
        """Call ``method`` on the peer and return its response, checked to be ``expect``.

        Raises `DeadlineExceeded` after ``timeout`` (default ``config.call_timeout``),
        `RemoteError` / `LimitExceeded` if the handler failed, `ProtocolError` for a malformed
        answer, `ConnectionClosed` if the channel closes first.
        """
        self._check_open()
        call_id = self._new_id()
        pending = _Pending()
        self._pending[call_id] = pending
        self.calls_made += 1
        deadline = self._config.call_timeout if timeout is None else timeout
        try:
            with trio.move_on_after(deadline) as scope:
                await self._send([Kind.CALL, call_id, method, request.to_wire()])
                await pending.event.wait()
        finally:
            del self._pending[call_id]
            if not pending.event.is_set():
                self._cancel_remote(call_id)
        if scope.cancelled_caught:
            raise DeadlineExceeded(f"{method} to {self.remote_peer_id} took over {deadline} s")
        if pending.error is not None:
            raise pending.error
        result: M = message_from_wire(pending.body, "response", expect=expect)
        return result

    async def notify(self, method: str, request: Message) -> None:
        """Run ``method`` on the peer without waiting for (or getting) an answer.

        For messages on a latency-critical path whose delivery the sender does not need to
        confirm; the handler's response and errors are dropped on the peer (errors logged).
        Raises `ConnectionClosed` if the channel is gone.
        """
        self._check_open()
        self.calls_made += 1
        await self._send([Kind.NOTIFY, self._new_id(), method, request.to_wire()])

    async def notify_at_once(self, method: str, request: Message, *, timeout: float) -> bool:
        """`notify` if the channel can take the message without waiting
        (`SecureChannel.can_send_at_once`: no other send in progress, a small message, a
        writable TCP socket); False, and nothing sent, otherwise. For a sender that must not
        be held up by a slow peer: it sends from its own task only when the kernel takes
        the message at once, and otherwise hands it to a task of its own. Should the send
        still stall, ``timeout`` seconds close the channel (`ConnectionClosed`), as
        ``send_timeout`` does for other sends. Raises `ConnectionClosed` if the channel is
        gone."""
        self._check_open()
        envelope = [Kind.NOTIFY, self._new_id(), method, request.to_wire()]
        data = msgpack.packb(envelope, use_bin_type=True)
        if not self.channel.can_send_at_once(len(data)):
            return False  # (an id left unused: ids need only be unique)
        self.calls_made += 1
        await self._send_packed(data, timeout, at_once=True)
        return True

    @asynccontextmanager
    async def open_stream(
        self, method: str, *, timeout: float | None = None
    ) -> AsyncIterator[RpcStream]:
        """Open a stream to ``method`` (a stream handler) on the peer.

        ``timeout`` (default ``config.call_timeout``) bounds each `RpcStream.receive`.
        Leaving the block ends our side; if the peer has not finished, it is cancelled.
        """
        self._check_open()
        call_id = self._new_id()
        per_receive = self._config.call_timeout if timeout is None else timeout
        stream = RpcStream(self, call_id, True, per_receive, self._config.stream_buffer)
        self._streams[call_id] = stream
        self.calls_made += 1
        try:
            await self._send([Kind.OPEN, call_id, method, None])
            yield stream
        finally:
            del self._streams[call_id]
            if not stream.finished:
                self._cancel_remote(call_id)

    def _cancel_remote(self, call_id: int) -> None:
        if self._nursery is not None and not self.is_closed:
            self._nursery.start_soon(self._send_quietly, [Kind.CANCEL, call_id, None, None])

    async def _send_quietly(self, envelope: list[Any]) -> None:
        try:
            await self._send(envelope)
        except ConnectionClosed:
            pass

    async def _send(self, envelope: list[Any]) -> None:
        """Send one envelope whole: shielded from cancellation, bounded by send_timeout."""
        self._check_open()
        await self._send_packed(msgpack.packb(envelope, use_bin_type=True))

    async def _send_packed(
        self, data: bytes, timeout: float | None = None, *, at_once: bool = False
    ) -> None:
        """Send one packed envelope whole: shielded from cancellation, bounded by
        ``timeout`` (default send_timeout), after which the channel is closed.

        A message that leaves at once (``at_once``: the caller just found that
        `SecureChannel.can_send_at_once`, or it does now) needs neither: it waits for
        nothing, and a caller cancelled already is told so here (`trio.Cancelled`) before
        the message is begun, which leaves the channel usable. It is written to the socket
        directly (`SecureChannel.send`'s ``at_once``), so it is no schedule point: that
        spares a cancel scope and trio's yield after the write, most of a small send's
        cost."""
        if at_once or self.channel.can_send_at_once(len(data)):
            await trio.lowlevel.checkpoint_if_cancelled()
            await self.channel.send(data, at_once=True)
            return
        seconds = self._config.send_timeout if timeout is None else timeout
        with trio.CancelScope(shield=True, deadline=trio.current_time() + seconds) as scope:
            await self.channel.send(data)
        if scope.cancelled_caught:
            await self.aclose()
            raise ConnectionClosed(f"send to {self.remote_peer_id} took over {seconds:g} s")

    def _check_open(self) -> None:
        if self.is_closed:
            raise ConnectionClosed(f"channel to {self.remote_peer_id} is closed")

    # ---- dispatch ----

    async def _read_loop(self) -> None:
        while True:
            try:
                data = await self.channel.receive()
            except ConnectionClosed:
                return
            except (ProtocolError, LimitExceeded) as exc:  # the channel is closed already
                log.warning("closing channel to %s: %s", self.remote_peer_id, exc)
                return
            try:
                kind, call_id, method, body = parse_envelope(data)
            except ProtocolError as exc:
                log.warning("closing channel to %s: %s", self.remote_peer_id, exc)
                return
            if kind in FROM_CALLER:
                self._dispatch_incoming(kind, call_id, method, body)
            else:
                self._dispatch_reply(kind, call_id, body)

    def _dispatch_reply(self, kind: Kind, call_id: int, body: Any) -> None:
        pending = self._pending.get(call_id)
        if pending is not None and kind in (Kind.RESULT, Kind.ERROR):
            if kind == Kind.ERROR:
                pending.error = remote_error(body)
            pending.body = body
            pending.event.set()
            return
        stream = self._streams.get(call_id)
        if stream is None:
            return  # a late answer to a call we gave up on
        if kind == Kind.S_DATA:
            if not stream._deliver("data", body):
                stream._end()
                stream.finished = True
                self._cancel_remote(call_id)
        elif kind == Kind.S_END:
            stream.finished = True
            stream._end()
        elif kind == Kind.ERROR:
            stream._deliver("error", remote_error(body))
            stream._end()

    def _dispatch_incoming(self, kind: Kind, call_id: int, method: str | None, body: Any) -> None:
        if kind in (Kind.CALL, Kind.OPEN, Kind.NOTIFY):
            self._start_handler(kind, call_id, method, body)
            return
        serving = self._serving.get(call_id)
        if serving is None:
            return  # finished already, or never existed
        scope, stream = serving
        if kind == Kind.CANCEL:
            scope.cancel()
        elif stream is not None and kind == Kind.C_END:
            stream._end()
        elif stream is not None and kind == Kind.C_DATA and not stream._deliver("data", body):
            scope.cancel()
            full = LimitExceeded("stream buffer full; the stream was cancelled")
            self._reply_error(call_id, full)

    def _start_handler(self, kind: Kind, call_id: int, method: str | None, body: Any) -> None:
        assert self._nursery is not None  # local invariant: dispatch runs inside run()
        error: SwarmError | None = None
        binding = self._handlers.lookup(method) if self._handlers is not None else None
        is_stream = binding is not None and binding.shape is Shape.STREAM
        if binding is None:
            error = RemoteError(ErrorCode.NOT_FOUND, f"unknown method {method!r:.70}")
        elif is_stream != (kind == Kind.OPEN):
            error = ProtocolError(f"method {method!r} is {'' if is_stream else 'not '}a stream")
        elif binding.shape is Shape.ONE_WAY and kind != Kind.NOTIFY:
            error = ProtocolError(f"method {method!r} is one-way: notify it")
        elif len(self._serving) >= self._config.max_concurrent_calls:
            error = LimitExceeded("too many concurrent calls on this channel")
        elif call_id in self._serving:
            error = ProtocolError(f"call id {call_id} is already in use")
        one_way = kind == Kind.NOTIFY
        if error is not None or binding is None or method is None:
            if one_way:
                log.info("dropping notify %r from %s: %s", method, self.remote_peer_id, error)
            else:
                self._reply_error(call_id, error or ProtocolError("no method"))
            return
        self.calls_served += 1
        ctx = CallContext(self.remote_peer_id, method, self.remote_host, self.via_relay)
        if binding.now is not None:
            self._run_now(binding.now, binding.request, body, ctx)
            return
        scope = trio.CancelScope()
        stream = (
            RpcStream(self, call_id, False, math.inf, self._config.stream_buffer)
            if is_stream
            else None
        )
        self._serving[call_id] = (scope, stream)
        self._nursery.start_soon(
            self._run_handler, binding, call_id, scope, stream, body, ctx, one_way
        )

    @staticmethod
    def _run_now(
        handler: Callable[..., None], request: type[Message] | None, body: Any, ctx: CallContext
    ) -> None:
        """A one-way handler that never waits (`OneWay.bind_now`), run here in the reader
        task; its errors are logged and dropped, as a notify's are in `_run_handler`."""
        try:
            handler(message_from_wire(body, "request", expect=request), ctx)
        except Exception as exc:
            if error_code(exc) is ErrorCode.INTERNAL:
                log.exception("handler of %s failed", ctx.method)
            else:
                log.info("notify %s from %s failed: %s", ctx.method, ctx.peer_id, exc)

    def _reply_error(self, call_id: int, exc: SwarmError) -> None:
        if self._nursery is not None:
            envelope = [Kind.ERROR, call_id, None, error_body(exc)]
            self._nursery.start_soon(self._send_quietly, envelope)

    async def _run_handler(
        self,
        binding: Binding,
        call_id: int,
        scope: trio.CancelScope,
        stream: RpcStream | None,
        body: Any,
        ctx: CallContext,
        one_way: bool = False,
    ) -> None:
        reply: list[Any] | None = None
        with scope:
            try:
                if stream is not None:
                    await binding.handler(TypedStream(stream, binding.sends, binding.receives), ctx)
                    reply = [Kind.S_END, call_id, None, None]
                else:
                    request = message_from_wire(body, "request", expect=binding.request)
                    response = await binding.handler(request, ctx)
                    if not one_way:
                        if binding.response is None or not isinstance(response, binding.response):
                            raise TypeError(
                                f"handler of {ctx.method} returned {type(response).__name__}"
                            )
                        reply = [Kind.RESULT, call_id, None, response.to_wire()]
            except Exception as exc:
                if error_code(exc) is ErrorCode.INTERNAL:
                    log.exception("handler of %s failed", ctx.method)
                else:
                    log.info("%s from %s: %s", ctx.method, ctx.peer_id, exc)
                reply = [Kind.ERROR, call_id, None, error_body(exc)]
        self._serving.pop(call_id, None)
        if one_way:
            if reply is not None and reply[0] == Kind.ERROR:
                log.info("notify %s from %s failed: %s", ctx.method, ctx.peer_id, reply[3])
            return
        if reply is not None and not scope.cancelled_caught:
            await self._send_quietly(reply)

    def _shutdown(self, exc: ConnectionClosed) -> None:
        self._closed = True
        for pending in self._pending.values():
            pending.error = exc
            pending.event.set()
        for stream in self._streams.values():
            stream._deliver("error", exc)
            stream._end()
