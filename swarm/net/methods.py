"""The three shapes an RPC method has, and the registry a server's handlers are found in.

A method is one row: its name and its message types. `Unary` (a request, a response),
`OneWay` (a request, no answer) and `Streaming` (messages both ways: what the caller may
send, what the callee may send). A row is also the typed way to call it (`Unary.call`,
`OneWay.notify`, `Streaming.open`) and to serve it (`Unary.bind` and its siblings take a
handler whose types mypy checks against the row). `HandlerRegistry` holds the bindings a
connection dispatches to; nothing is found by name with ``getattr``.

The product's rows are in `swarm.net.surface`; a test adds a method with one row, one
handler and one stub.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

import trio

from swarm.errors import ProtocolError
from swarm.net.messages import Message

if TYPE_CHECKING:
    from swarm.net.rpc import CallContext, RpcConnection, RpcStream

__all__ = [
    "Binding",
    "HandlerRegistry",
    "OneWay",
    "Shape",
    "Streaming",
    "TypedStream",
    "Unary",
]

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)
Out = TypeVar("Out", bound=Message)  # what this side of a stream sends
In = TypeVar("In", bound=Message)  # what this side of a stream receives
M = TypeVar("M", bound=Message)


class Shape(enum.Enum):
    UNARY = "unary"
    ONE_WAY = "one-way"
    STREAM = "stream"


@dataclass(frozen=True)
class Binding:
    """One method's handler as a connection dispatches it (built by a row's ``bind``)."""

    name: str
    shape: Shape
    handler: Callable[..., Awaitable[Any]]
    request: type[Message] | None = None  # unary and one-way: the request's type
    response: type[Message] | None = None  # unary: the response's type
    receives: tuple[type[Message], ...] = ()  # stream: what the caller may send
    sends: tuple[type[Message], ...] = ()  # stream: what the handler may send
    now: Callable[..., None] | None = None  # one-way: run as it arrives (`OneWay.bind_now`)


class HandlerRegistry:
    """The handlers a connection serves, by method name. Raises `ValueError` for two
    bindings of one name."""

    def __init__(self, bindings: Iterable[Binding] = ()) -> None:
        self._bindings: dict[str, Binding] = {}
        for binding in bindings:
            if binding.name in self._bindings:
                raise ValueError(f"method {binding.name!r} is bound twice")
            self._bindings[binding.name] = binding

    def lookup(self, name: str | None) -> Binding | None:
        return None if name is None else self._bindings.get(name)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._bindings)

    def with_bindings(self, bindings: Iterable[Binding]) -> HandlerRegistry:
        """A copy that also serves ``bindings`` (a server adds the helper methods it offers
        others, e.g. dial-back and relaying). Raises `ValueError` for a name bound already."""
        return HandlerRegistry([*self._bindings.values(), *bindings])

    def replace(self, binding: Binding) -> HandlerRegistry:
        """A copy with ``binding`` in place of the one of its name (a handler-wrapping seam:
        tests wrap or replace one method of an honest server)."""
        if binding.name not in self._bindings:
            raise ValueError(f"method {binding.name!r} is not bound")
        return HandlerRegistry({**self._bindings, binding.name: binding}.values())


@dataclass(frozen=True)
class Unary(Generic[Req, Resp]):
    """A request answered by one response."""

    name: str
    request: type[Req]
    response: type[Resp]

    def bind(self, handler: Callable[[Req, CallContext], Awaitable[Resp]]) -> Binding:
        return Binding(self.name, Shape.UNARY, handler, self.request, self.response)

    async def call(
        self, conn: RpcConnection, request: Req, *, timeout: float | None = None
    ) -> Resp:
        """See `RpcConnection.call` for what is raised."""
        return await conn.call(self.name, request, self.response, timeout=timeout)


@dataclass(frozen=True)
class OneWay(Generic[Req]):
    """A request with no answer (a notify): the handler's errors stay in the callee's log."""

    name: str
    request: type[Req]

    def bind(self, handler: Callable[[Req, CallContext], Awaitable[None]]) -> Binding:
        return Binding(self.name, Shape.ONE_WAY, handler, self.request)

    def bind_now(self, handler: Callable[[Req, CallContext], None]) -> Binding:
        """A handler that never waits: the connection runs it in its reader task as the
        notify arrives, instead of starting a task for it (a task and a scheduling round
        less per message; the next message is read once it returns)."""

        async def run(request: Req, ctx: CallContext) -> None:
            handler(request, ctx)

        return Binding(self.name, Shape.ONE_WAY, run, self.request, now=handler)

    async def notify(self, conn: RpcConnection, request: Req) -> None:
        """See `RpcConnection.notify` for what is raised."""
        await conn.notify(self.name, request)

    async def notify_at_once(self, conn: RpcConnection, request: Req, *, timeout: float) -> bool:
        """`notify` only if it need not wait; see `RpcConnection.notify_at_once`."""
        return await conn.notify_at_once(self.name, request, timeout=timeout)


@dataclass(frozen=True)
class Streaming(Generic[Out, In]):
    """A bidirectional stream: the caller sends ``Out`` messages (types ``up``), the handler
    ``In`` messages (types ``down``). The type parameters are the caller's view."""

    name: str
    up: tuple[type[Out], ...]
    down: tuple[type[In], ...]

    def bind(
        self, handler: Callable[[TypedStream[In, Out], CallContext], Awaitable[None]]
    ) -> Binding:
        return Binding(self.name, Shape.STREAM, handler, receives=self.up, sends=self.down)

    @asynccontextmanager
    async def open(
        self, conn: RpcConnection, *, timeout: float | None = None
    ) -> AsyncIterator[TypedStream[Out, In]]:
        """See `RpcConnection.open_stream`; ``timeout`` bounds each receive."""
        async with conn.open_stream(self.name, timeout=timeout) as raw:
            yield TypedStream(raw, self.up, self.down)


class TypedStream(Generic[Out, In]):
    """One side of a stream, checked against its row: `send` takes this side's messages,
    `receive` returns the other side's (a message of another type is a `ProtocolError`)."""

    def __init__(
        self,
        raw: RpcStream,
        sends: tuple[type[Message], ...],
        receives: tuple[type[Message], ...],
    ) -> None:
        self.raw = raw
        self._sends = sends
        self._receives = receives

    @property
    def finished(self) -> bool:
        return self.raw.finished

    async def send(self, msg: Out) -> None:
        if not isinstance(msg, self._sends):
            raise TypeError(f"{type(msg).__name__} is not sent on this stream")
        await self.raw.send(msg)

    async def send_end(self) -> None:
        await self.raw.send_end()

    async def receive(self, expect: type[M], timeout: float | None = None) -> M:
        """The next message, which must be an ``expect``. Raises what `RpcStream.receive`
        raises (`trio.EndOfChannel` at the end), and `ProtocolError` for another type."""
        if expect not in self._receives:
            raise TypeError(f"{expect.__name__} is not received on this stream")
        msg: M = await self.raw.receive(expect, timeout)
        return msg

    async def receive_any(self, timeout: float | None = None) -> In:
        """The next message, of any type the other side may send."""
        return self._check(await self.raw.receive(None, timeout))

    def receive_any_nowait(self) -> In:
        """The next message if one has arrived (as `receive_any`); `trio.WouldBlock` if
        none has (`RpcStream.receive_nowait`)."""
        return self._check(self.raw.receive_nowait(None))

    def on_arrival(self, wake: Callable[[], None] | None) -> None:
        """See `RpcStream.on_arrival`."""
        self.raw.on_arrival(wake)

    def _check(self, msg: Message) -> In:
        if not isinstance(msg, self._receives):
            raise ProtocolError(f"stream.body.t: {msg.TAG!r} is not sent on this stream")
        return cast(In, msg)

    def __aiter__(self) -> TypedStream[Out, In]:
        return self

    async def __anext__(self) -> In:
        try:
            return await self.receive_any()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
