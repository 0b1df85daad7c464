"""The RPC surface is a table: a new method is one row, one handler and one stub.

mypy checks this file (``[tool.mypy] files`` in pyproject.toml): the handler's and the
stub's types are checked against the row, so a handler answering the wrong message, or a
stub passing the wrong request, fails ``make typecheck``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import assert_type

import pytest
import torch
import trio

from swarm.errors import ProtocolError, RemoteError
from swarm.net.messages import (
    ForwardRequest,
    ForwardResponse,
    InferenceInput,
    InferenceOpen,
    InferenceReady,
    InferenceStepResult,
    InfoRequest,
    InfoResponse,
    NewPusher,
    PushRequest,
)
from swarm.net.methods import Binding, HandlerRegistry, TypedStream, Unary
from swarm.net.rpc import CallContext, RpcConnection
from swarm.net.surface import (
    FORWARD,
    INFERENCE,
    INFO,
    PUSH,
    SERVER_METHODS,
    InferenceDown,
    InferenceUp,
    call_info,
    open_inference,
    server_registry,
)
from swarm.types import LayerRange, PeerId, ServerState

from .conftest import channel_pair

# ---- the new method: one row, one handler, one stub ----

ECHO = Unary("echo", ForwardRequest, ForwardResponse)


async def rpc_echo(request: ForwardRequest, ctx: CallContext) -> ForwardResponse:
    return ForwardResponse(request.hidden_states + 1)


async def call_echo(conn: RpcConnection, request: ForwardRequest) -> ForwardResponse:
    return await ECHO.call(conn, request, timeout=5)


async def _what_mypy_refuses(conn: RpcConnection) -> None:
    """Never run: each line is a type error that mypy must report (this module is checked
    with ``warn_unused_ignores``, so an ignore that stops being needed fails the check)."""
    ECHO.bind(rpc_info)  # type: ignore[arg-type]  # a handler of another row
    await ECHO.call(conn, InfoRequest())  # type: ignore[arg-type]  # the wrong request
    info: InfoResponse = await call_echo(conn, ECHO_REQUEST)  # type: ignore[assignment]
    del info


ECHO_REQUEST = ForwardRequest(torch.ones(1, 2, 4), torch.zeros(1, 2).long(), LayerRange(0, 1))

# ---- a server of the table's rows plus the new one ----

INFO_REPLY = InfoResponse(LayerRange(0, 2), ServerState.ONLINE, 0.0, 10, "t", 1.0)


async def rpc_info(request: InfoRequest, ctx: CallContext) -> InfoResponse:
    return INFO_REPLY


async def rpc_forward(request: ForwardRequest, ctx: CallContext) -> ForwardResponse:
    return ForwardResponse(request.hidden_states)


async def rpc_push(request: PushRequest, ctx: CallContext) -> None:
    return None


async def rpc_inference(stream: TypedStream[InferenceDown, InferenceUp], ctx: CallContext) -> None:
    opened = await stream.receive(InferenceOpen)
    await stream.send(InferenceReady(opened.session_id, 10))
    async for msg in stream:
        if isinstance(msg, InferenceInput):
            await stream.send(InferenceStepResult(msg.step, msg.hidden_states * 2))


def bindings() -> list[Binding]:
    return [
        INFO.bind(rpc_info),
        FORWARD.bind(rpc_forward),
        INFERENCE.bind(rpc_inference),
        PUSH.bind(rpc_push),
    ]


@pytest.fixture
async def conn() -> AsyncIterator[RpcConnection]:
    a, b = await channel_pair()
    registry = HandlerRegistry([*bindings(), ECHO.bind(rpc_echo)])
    client, server = RpcConnection(a), RpcConnection(b, registry)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        await nursery.start(server.run)
        with trio.fail_after(20):
            yield client
        nursery.cancel_scope.cancel()


async def test_a_new_method_is_a_row_a_handler_and_a_stub(conn: RpcConnection) -> None:
    reply = await call_echo(conn, ECHO_REQUEST)
    assert_type(reply, ForwardResponse)
    assert torch.equal(reply.hidden_states, ECHO_REQUEST.hidden_states + 1)
    info = await call_info(conn)
    assert_type(info, InfoResponse)
    assert info == INFO_REPLY


async def test_typed_stream_checks_both_directions(conn: RpcConnection) -> None:
    async with open_inference(conn, timeout=5) as stream:
        await stream.send(InferenceOpen(b"s" * 16, 8, 1, "float32", LayerRange(0, 2)))
        ready = await stream.receive(InferenceReady)
        assert_type(ready, InferenceReady)
        await stream.send(NewPusher(PeerId(b"p" * 32)))  # news, then an input
        await stream.send(InferenceInput(0, torch.ones(1, 1, 4), torch.zeros(1, 1).long()))
        result = await stream.receive(InferenceStepResult)
        assert torch.equal(result.hidden_states, torch.full((1, 1, 4), 2.0))
        with pytest.raises(TypeError):  # not a message the caller sends on this stream
            await stream.send(InfoRequest())  # type: ignore[arg-type]
        with pytest.raises(TypeError):  # nor one it receives
            await stream.receive(InfoResponse)


async def test_shapes_are_enforced_on_the_wire(conn: RpcConnection) -> None:
    x = torch.ones(1, 1, 4)
    push = PushRequest(b"s", 0, x, torch.zeros(1, 1).long())
    with pytest.raises(RemoteError, match="one-way"):
        await conn.call("push", push, InfoResponse)  # a one-way method answers nothing
    with pytest.raises(RemoteError, match="is not a stream"):
        async with conn.open_stream("info", timeout=5) as raw:
            await raw.receive()
    with pytest.raises(ProtocolError, match="expected 'forward_response'"):
        await conn.call("info", InfoRequest(), ForwardResponse)


def test_the_server_registry_is_the_whole_table() -> None:
    assert server_registry(bindings()).names == SERVER_METHODS
    with pytest.raises(ValueError, match="missing"):
        server_registry(bindings()[:-1])
    with pytest.raises(ValueError, match="unknown"):
        server_registry([*bindings(), ECHO.bind(rpc_echo)])
    with pytest.raises(ValueError, match="bound twice"):
        HandlerRegistry([INFO.bind(rpc_info), INFO.bind(rpc_info)])
