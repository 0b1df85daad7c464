"""The RPC surface of a server, declared once: each method's row, and its calling stub.

=============  =========  ==========================================  ========================
method         shape      caller sends                                callee answers
=============  =========  ==========================================  ========================
``info``       unary      `InfoRequest`                               `InfoResponse`
``forward``    unary      `ForwardRequest`                            `ForwardResponse`
``inference``  stream     `InferenceOpen`, then `InferenceInput`,     `InferenceReady`, then
                          `NewPushTarget`, `NewPusher`                `InferenceStepResult`
``push``       one-way    `PushRequest`                               (nothing)
=============  =========  ==========================================  ========================

Callers use the stubs below (``call_info``, ``call_forward``, ``open_inference``,
``notify_push``, ``notify_push_at_once``); the server binds one handler per row
(`SERVER_METHODS`), and a registry missing a row or holding another is refused
(`server_registry`).

What reachable peers (servers and ``swarm dht`` nodes) offer others, `HELPER_METHODS`:

=================  =========  ==================  ===========================================
method             shape      caller sends        callee answers
=================  =========  ==================  ===========================================
``dial_back``      unary      `DialBackRequest`   `DialBackResponse` (`swarm.net.dialback`)
``relay_reserve``  stream     `RelayReserve`      `RelayReady` (and heartbeats), `RelayCircuit`
                                                  per dialer waiting (`swarm.net.relay`)
=================  =========  ==================  ===========================================

A relayed peer also offers ``hole_punch`` (stream: the caller sends `PunchConnect`, then
`PunchSync`; the callee answers `PunchConnect`; `swarm.net.punch`) to upgrade a relayed
channel to a direct one.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING

from swarm.net.messages import (
    DialBackRequest,
    DialBackResponse,
    ForwardRequest,
    ForwardResponse,
    InferenceInput,
    InferenceOpen,
    InferenceReady,
    InferenceStepResult,
    InfoRequest,
    InfoResponse,
    NewPusher,
    NewPushTarget,
    PunchConnect,
    PunchSync,
    PushRequest,
    RelayCircuit,
    RelayReady,
    RelayReserve,
)
from swarm.net.methods import Binding, HandlerRegistry, OneWay, Streaming, TypedStream, Unary

if TYPE_CHECKING:
    from swarm.net.rpc import RpcConnection

__all__ = [
    "DIAL_BACK",
    "FORWARD",
    "HELPER_METHODS",
    "HOLE_PUNCH",
    "INFERENCE",
    "INFO",
    "PUSH",
    "RELAY_RESERVE",
    "SERVER_METHODS",
    "InferenceDown",
    "InferenceUp",
    "PunchUp",
    "RelayDown",
    "call_dial_back",
    "call_forward",
    "call_info",
    "notify_push",
    "notify_push_at_once",
    "open_hole_punch",
    "open_inference",
    "open_relay_reserve",
    "server_registry",
]

InferenceUp = InferenceOpen | InferenceInput | NewPushTarget | NewPusher
InferenceDown = InferenceReady | InferenceStepResult

INFO = Unary("info", InfoRequest, InfoResponse)
FORWARD = Unary("forward", ForwardRequest, ForwardResponse)
INFERENCE: Streaming[InferenceUp, InferenceDown] = Streaming(
    "inference",
    up=(InferenceOpen, InferenceInput, NewPushTarget, NewPusher),
    down=(InferenceReady, InferenceStepResult),
)
PUSH = OneWay("push", PushRequest)

SERVER_METHODS: frozenset[str] = frozenset(m.name for m in (INFO, FORWARD, INFERENCE, PUSH))

RelayDown = RelayReady | RelayCircuit
DIAL_BACK = Unary("dial_back", DialBackRequest, DialBackResponse)
RELAY_RESERVE: Streaming[RelayReserve, RelayDown] = Streaming(
    "relay_reserve", up=(RelayReserve,), down=(RelayReady, RelayCircuit)
)
PunchUp = PunchConnect | PunchSync
HOLE_PUNCH: Streaming[PunchUp, PunchConnect] = Streaming(
    "hole_punch", up=(PunchConnect, PunchSync), down=(PunchConnect,)
)
HELPER_METHODS: frozenset[str] = frozenset(m.name for m in (DIAL_BACK, RELAY_RESERVE))


def server_registry(bindings: Iterable[Binding]) -> HandlerRegistry:
    """A server's registry: one binding per row of the surface. Raises `ValueError` if a row
    has none or a binding is for a method the surface does not have."""
    registry = HandlerRegistry(bindings)
    if registry.names != SERVER_METHODS:
        missing, extra = SERVER_METHODS - registry.names, registry.names - SERVER_METHODS
        raise ValueError(f"server handlers: missing {sorted(missing)}, unknown {sorted(extra)}")
    return registry


async def call_info(conn: RpcConnection, *, timeout: float | None = None) -> InfoResponse:
    """What the server serves and how loaded it is."""
    return await INFO.call(conn, InfoRequest(), timeout=timeout)


async def call_forward(
    conn: RpcConnection, request: ForwardRequest, *, timeout: float | None = None
) -> ForwardResponse:
    """A stateless forward of whole sequences through a sub-range of the server's span."""
    return await FORWARD.call(conn, request, timeout=timeout)


def open_inference(
    conn: RpcConnection, *, timeout: float | None = None
) -> AbstractAsyncContextManager[TypedStream[InferenceUp, InferenceDown]]:
    """An ``inference`` stream (``timeout`` bounds each receive): send `InferenceOpen`,
    receive `InferenceReady`, then steps."""
    return INFERENCE.open(conn, timeout=timeout)


async def notify_push(conn: RpcConnection, request: PushRequest) -> None:
    """A hop's output delivered to the next hop's session, without an answer."""
    await PUSH.notify(conn, request)


async def notify_push_at_once(conn: RpcConnection, request: PushRequest, *, timeout: float) -> bool:
    """`notify_push` if the channel takes it without waiting; False (nothing sent) if it
    would wait (`RpcConnection.notify_at_once`)."""
    return await PUSH.notify_at_once(conn, request, timeout=timeout)


async def call_dial_back(
    conn: RpcConnection, request: DialBackRequest, *, timeout: float | None = None
) -> DialBackResponse:
    """Ask a helper to dial ``request``'s address back and handshake with us."""
    return await DIAL_BACK.call(conn, request, timeout=timeout)


def open_relay_reserve(
    conn: RpcConnection, *, timeout: float | None = None
) -> AbstractAsyncContextManager[TypedStream[RelayReserve, RelayDown]]:
    """A ``relay_reserve`` stream (``timeout`` bounds each receive): send `RelayReserve`,
    receive `RelayReady`, then heartbeats and `RelayCircuit` offers."""
    return RELAY_RESERVE.open(conn, timeout=timeout)


def open_hole_punch(
    conn: RpcConnection, *, timeout: float | None = None
) -> AbstractAsyncContextManager[TypedStream[PunchUp, PunchConnect]]:
    """A ``hole_punch`` stream: send `PunchConnect`, receive the peer's, send `PunchSync`."""
    return HOLE_PUNCH.open(conn, timeout=timeout)
