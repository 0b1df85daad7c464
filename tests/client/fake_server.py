"""A minimal in-process inference server for the client's tests (the real one is
`swarm.server`): real `Span` compute with a KV cache per session, push to the next hop,
and switches to make it die, hang, hold a step until released, or refuse."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import torch
import trio

from swarm.client.routing import ServerView
from swarm.errors import ErrorCode, LimitExceeded, RemoteError
from swarm.identity import Identity
from swarm.net.messages import (
    InferenceInput,
    InferenceOpen,
    InferenceReady,
    InferenceStepResult,
    InfoRequest,
    InfoResponse,
    NewPusher,
    NewPushTarget,
    PushRequest,
    PushTarget,
)
from swarm.net.methods import HandlerRegistry, TypedStream
from swarm.net.pool import ConnectionPool, open_connection_pool
from swarm.net.rpc import CallContext
from swarm.net.rpc_server import RpcServer
from swarm.net.surface import INFERENCE, INFO, PUSH, InferenceDown, InferenceUp, notify_push
from swarm.shards import KVCache, Span
from swarm.types import format_address

Stream = TypedStream[InferenceDown, InferenceUp]


@dataclass
class _Session:
    next_step: int
    push_to: PushTarget | None
    # step -> (hidden, positions, keep: cache tokens kept before it, None: all)
    inputs: dict[int, tuple[torch.Tensor, torch.Tensor, int | None]] = field(default_factory=dict)
    changed: trio.Event = field(default_factory=trio.Event)

    def offer(
        self, step: int, hidden: torch.Tensor, positions: torch.Tensor, keep: int | None
    ) -> bool:
        if step < self.next_step or step in self.inputs:
            return False
        self.inputs[step] = (hidden, positions, keep)
        self.changed.set()
        return True


class FakeServer:
    def __init__(self, span: Span, identity: Identity) -> None:
        self.span = span
        self.identity = identity
        self.sessions: dict[bytes, _Session] = {}
        self.pool: ConnectionPool | None = None
        self.hang_at_step: int | None = None
        self.hold_at_step: int | None = None  # sets `holding`, answers once `release` is set
        self.holding = trio.Event()
        self.release = trio.Event()
        self.opened = 0  # sessions opened
        self.die_at_step: int | None = None
        self.step_delay = 0.0  # seconds every step takes before it computes (a slow server)
        self.refuse_open = False
        self.died = trio.Event()
        self.steps_from_client = 0
        self.steps_from_push = 0
        self.port = 0

    def view(self, throughput: float = 100.0) -> ServerView:
        return ServerView(
            self.identity.peer_id,
            format_address("127.0.0.1", self.port),
            self.span.layers,
            throughput,
            10_000,
        )

    async def rpc_info(self, request: InfoRequest, ctx: CallContext) -> InfoResponse:
        return InfoResponse(self.span.layers, "online", 0.0, 10_000, "test", 100.0)

    def registry(self) -> HandlerRegistry:
        return HandlerRegistry(
            [INFO.bind(self.rpc_info), INFERENCE.bind(self.rpc_inference), PUSH.bind(self.rpc_push)]
        )

    async def rpc_push(self, request: PushRequest, ctx: CallContext) -> None:
        session = self.sessions.get(request.session_id)
        ok = session is not None and session.offer(
            request.step, request.hidden_states, request.positions, request.keep
        )
        self.steps_from_push += int(ok)

    async def rpc_inference(self, stream: Stream, ctx: CallContext) -> None:
        opening = await stream.receive(InferenceOpen, timeout=5)
        if self.refuse_open:
            raise LimitExceeded("no cache left")
        span = self.span.narrow(opening.layer_range)
        cache = KVCache.allocate(
            span.config, opening.layer_range, opening.batch_size, opening.max_length
        )
        session = _Session(opening.first_step, opening.push_to)
        self.opened += 1
        self.sessions[opening.session_id] = session
        await stream.send(InferenceReady(opening.session_id, 10_000))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read, stream, session, nursery.cancel_scope)
                await self._run(stream, session, span, cache)
        except BaseExceptionGroup as group:  # report the handler's own error, unwrapped
            raise group.exceptions[0] from None
        finally:
            del self.sessions[opening.session_id]

    async def _read(self, stream: Stream, session: _Session, scope: trio.CancelScope) -> None:
        try:
            async for msg in stream:
                if isinstance(msg, NewPushTarget):
                    session.push_to = msg.push_to
                elif isinstance(msg, InferenceInput):
                    ok = session.offer(msg.step, msg.hidden_states, msg.positions, msg.keep)
                    self.steps_from_client += int(ok)
                elif not isinstance(msg, NewPusher):
                    raise RemoteError(ErrorCode.BAD_REQUEST, "expected a step")
        finally:
            scope.cancel()

    async def _run(self, stream: Stream, session: _Session, span: Span, cache: KVCache) -> None:
        while True:
            step = session.next_step
            with trio.fail_after(10):
                while step not in session.inputs:
                    session.changed = trio.Event()
                    await session.changed.wait()
            if step == self.hang_at_step:
                await trio.sleep_forever()
            if step == self.hold_at_step:
                self.holding.set()
                await self.release.wait()
            if self.step_delay:
                await trio.sleep(self.step_delay)
            if step == self.die_at_step:
                self.died.set()
                await trio.sleep_forever()
            hidden, positions, keep = session.inputs.pop(step)
            if hidden.shape[-1] != span.config.hidden_size:
                raise RemoteError(ErrorCode.BAD_REQUEST, "wrong hidden size")
            if keep is not None:
                cache.truncate(keep)  # guesses of the last step that were not accepted
            with torch.inference_mode():
                out = span(hidden.to(span.dtype), positions, cache)  # (batch, seq, hidden)
            session.next_step += 1
            if session.push_to is not None and self.pool is not None:
                await self._push(session.push_to, step, out, positions, keep)
            await stream.send(InferenceStepResult(step, out))

    async def _push(
        self,
        target: PushTarget,
        step: int,
        out: torch.Tensor,
        positions: torch.Tensor,
        keep: int | None,
    ) -> None:
        assert self.pool is not None
        request = PushRequest(target.session_id, step, out, positions, keep)
        try:
            with trio.move_on_after(2):
                await notify_push(
                    await self.pool.get(target.host, target.port, target.peer_id), request
                )
        except Exception:
            pass


@asynccontextmanager
async def run_servers(servers: list[FakeServer]) -> AsyncIterator[list[FakeServer]]:
    """Serve each fake server on 127.0.0.1 port 0; a server whose `died` event is set is
    torn down (listener and connections), like a killed process."""
    async with trio.open_nursery() as nursery:
        for server in servers:
            await nursery.start(_serve_one, server)
        yield servers
        nursery.cancel_scope.cancel()


async def _serve_one(server: FakeServer, *, task_status: trio.TaskStatus[None]) -> None:
    async with open_connection_pool(server.identity) as pool:
        server.pool = pool
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                rpc = RpcServer(server.identity, server.registry())
                server.port = await nursery.start(rpc.serve, "127.0.0.1", 0)
                task_status.started()
                await server.died.wait()
                scope.cancel()
