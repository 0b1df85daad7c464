"""The server's RPC handlers: ``info``, ``forward``, ``inference`` (a stream) and ``push``.

Model work goes through the `ComputeQueue`, which batches concurrent sessions' steps and
chunks long prompts and forwards, fairly over clients (`CLIENT` is set to the caller). An
``inference`` stream owns one session: its task runs steps strictly in order, each as soon
as its input arrived from the client or from the previous server's ``push``, and takes the
client's step messages (inputs and push-target changes) as they arrive: the stream and the
pushes wake it (`Session.wake`), with no reader task in between. After a step, its output
goes to the next server, then back on the stream (best effort: a failed push is logged, and
the client sends that input itself). The push leaves from the step's task when the channel
takes it at once, and from a task of its own otherwise, so a slow next server never holds
up the answer to the client.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import trio

from swarm.errors import (
    ErrorCode,
    LimitExceeded,
    ProtocolError,
    RemoteError,
    SessionError,
    ShardError,
    SwarmError,
    unwrap_group,
)
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
    NewPushTarget,
    PushRequest,
    PushTarget,
    RangeMove,
    Receipt,
)
from swarm.net.methods import HandlerRegistry, TypedStream
from swarm.net.pool import ConnectionPool
from swarm.net.rpc import CallContext
from swarm.net.surface import (
    FORWARD,
    INFERENCE,
    INFO,
    PUSH,
    InferenceDown,
    InferenceUp,
    notify_push,
    notify_push_at_once,
    server_registry,
)
from swarm.server.capacity import SpanTimings
from swarm.server.compute import CLIENT, ComputeQueue, Priority, Requester
from swarm.server.config import ServerConfig
from swarm.server.sessions import Session, SessionTable, StepInput
from swarm.shards.cache import KVCache
from swarm.shards.span import Span
from swarm.types import LayerRange, Reachability, ServerState
from swarm.verify.receipts import make_receipt

__all__ = ["ServingHandlers", "ServingState"]

log = logging.getLogger(__name__)


@dataclass
class ServingState:
    """What the handlers and the announcer share; mutated only from the trio thread."""

    model_id: str
    version: str
    throughput: float = 0.0
    state: ServerState = ServerState.JOINING  # joining -> online -> draining
    timings: SpanTimings | None = None  # measured at start-up (None: not measured)
    timings_final: bool = False  # False: a first estimate, too rough to refuse work by
    moving_to: LayerRange | None = None  # rebalancing: loading this range to move there
    last_move: RangeMove | None = None  # the latest move, announced for status pages
    reachability: Reachability = Reachability.UNKNOWN  # set by the ReachabilityKeeper
    relayed: bool = False

    def throughput_at(self, active_sessions: int) -> float:
        """Tokens/s one more session would get here now: measured at the batch it would
        join (``active_sessions + 1`` decode steps batched); `throughput` unmeasured."""
        if self.timings is None:
            return self.throughput
        return self.timings.throughput(active_sessions + 1)


def _check_positions(hidden: torch.Tensor, positions: torch.Tensor) -> None:
    if hidden.dim() != 3:
        raise ShardError(f"hidden states must be (batch, seq, hidden), got {list(hidden.shape)}")
    if positions.dtype != torch.int64 or tuple(positions.shape) != tuple(hidden.shape[:2]):
        raise ShardError(
            f"positions must be int64 {list(hidden.shape[:2])}, got {positions.dtype} "
            f"{list(positions.shape)}"
        )
    if not hidden.dtype.is_floating_point:
        raise ShardError(f"hidden states must be floating point, got {hidden.dtype}")


ServerStream = TypedStream[InferenceDown, InferenceUp]  # the server's side of ``inference``


class ServingHandlers:
    """``rpc_<verb>`` handlers of one server (see the module docstring); `registry` binds
    them to the rows of `swarm.net.surface`."""

    def __init__(
        self,
        config: ServerConfig,
        span: Span,
        state: ServingState,
        sessions: SessionTable,
        queue: ComputeQueue,
        pool: ConnectionPool,
    ) -> None:
        self.config = config
        self.span = span
        self.state = state
        self.sessions = sessions
        self.queue = queue
        self.pool = pool

    def registry(self) -> HandlerRegistry:
        """The handlers as the RPC layer dispatches them, one per row of the surface."""
        return server_registry(
            [
                INFO.bind(self.rpc_info),
                FORWARD.bind(self.rpc_forward),
                INFERENCE.bind(self.rpc_inference),
                PUSH.bind_now(self.rpc_push),
            ]
        )

    async def compute(
        self,
        span: Span,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None,
        priority: Priority,
    ) -> torch.Tensor:
        """The one place model work runs (on the compute queue): every forward and step.

        The output is what this server vouches for: it is pushed, returned and signed.
        (`swarm.testing.adversaries` overrides this to make a peer lie.)
        """
        out: torch.Tensor = await self.queue.run_span(span, hidden, positions, cache, priority)
        return out

    # ---- info and stateless forward ----

    async def rpc_info(self, request: InfoRequest, ctx: CallContext) -> InfoResponse:
        return InfoResponse(
            layer_range=self.span.layers,
            state=self.state.state,
            load=len(self.sessions) / self.sessions.limits.max_sessions,
            free_cache_tokens=self.sessions.free_tokens,
            version=self.state.version,
            throughput=self.state.throughput_at(len(self.sessions)),
            model_id=self.state.model_id,
            dtype=str(self.span.dtype).removeprefix("torch."),
            quantization=self.span.quantization.value,
            numerics=self.span.numerics,
            active_sessions=len(self.sessions),
            reachability=self.state.reachability,
            relayed=self.state.relayed,
        )

    async def rpc_forward(self, request: ForwardRequest, ctx: CallContext) -> ForwardResponse:
        """Stateless forward of whole sequences through a sub-range of our span."""
        span = self._narrow(request.layer_range)
        hidden, positions = request.hidden_states, request.positions
        _check_positions(hidden, positions)
        CLIENT.set(Requester(ctx.peer_id, ctx.peer_host))
        rows, seq = int(hidden.shape[0]), int(hidden.shape[1])
        self._check_forward_size(rows, seq)
        if seq <= self.queue.prefill_chunk:
            out = await self.compute(span, hidden, positions, None, Priority.FORWARD)
        else:  # chunked through a temporary cache, held against the cache budget
            with self.sessions.reserve(rows * seq):
                cache = KVCache.allocate(
                    span.config, span.layers, rows, seq, span.dtype, span.device
                )
                out = await self.compute(span, hidden, positions, cache, Priority.FORWARD)
                del cache
        receipt = self._receipt(request.layer_range, b"", 0, hidden, out)
        return ForwardResponse(out, receipt)

    def _check_forward_size(self, rows: int, seq: int) -> None:
        """Refuse a forward over the token limit, or one that the measured timings say
        would not finish within the client's deadline (with a factor 2 of margin: decode
        steps share the batches, and chunked attention runs slower than one pass)."""
        limits, tokens = self.sessions.limits, rows * seq
        if tokens > limits.max_length * limits.max_batch:
            raise LimitExceeded(
                f"forward of {tokens} tokens is over the limit of "
                f"{limits.max_length * limits.max_batch}"
            )
        timings = self.state.timings
        if timings is None or not self.state.timings_final:  # a first estimate: no refusal
            return
        seconds, budget = 2 * timings.forward_seconds(rows, seq), self.config.forward_deadline
        if seconds > budget:
            raise LimitExceeded(
                f"forward of {tokens} tokens would take about {seconds:.0f} s here, over the "
                f"{budget:.0f} s a client waits; send shorter forwards or ask another server"
            )

    # ---- inference sessions ----

    async def rpc_inference(self, stream: ServerStream, ctx: CallContext) -> None:
        """One session: open, then steps until the client ends the stream."""
        opened = await stream.receive(InferenceOpen, timeout=self.config.step_timeout)
        if self.state.state is ServerState.DRAINING:
            raise RemoteError(ErrorCode.UNAVAILABLE, "server is draining: no new sessions")
        self._narrow(opened.layer_range)  # refuse ranges we do not serve before allocating
        CLIENT.set(Requester(ctx.peer_id, ctx.peer_host))  # the fairness key of its steps
        session = self.sessions.open(
            opened.session_id,
            ctx.peer_id,
            opened.layer_range,
            opened.max_length,
            opened.batch_size,
            ctx.peer_host,
        )
        session.push_to = opened.push_to
        session.push_from = opened.push_from
        session.next_step = opened.first_step
        try:
            await stream.send(InferenceReady(session.session_id, self.sessions.free_tokens))
            try:
                async with trio.open_nursery() as nursery:
                    session.scope = nursery.cancel_scope
                    stream.on_arrival(session.wake)
                    await self._process_steps(stream, session, nursery)
                    nursery.cancel_scope.cancel()  # the client ended the stream
            except BaseExceptionGroup as group:
                inner = unwrap_group(group)  # the session's real error, not its siblings'
                raise inner if isinstance(inner, Exception) else group from None
            if session.close_reason is not None:  # closed by the table: say why
                raise session.close_reason
        except SwarmError as exc:
            log.info("session %s failed: %s", session.session_id.hex()[:8], exc)
            raise
        finally:
            self.sessions.close(session.session_id)

    def _take_messages(self, stream: ServerStream, session: Session) -> bool:
        """Act on the client's step messages that have arrived, without waiting; False once
        the client ended the stream (which ends the session)."""
        limit = self.sessions.limits.max_pending_steps
        while True:
            try:
                msg = stream.receive_any_nowait()
            except trio.WouldBlock:
                return True
            except trio.EndOfChannel:
                return False
            if isinstance(msg, NewPushTarget):
                session.push_to = msg.push_to
            elif isinstance(msg, NewPusher):
                session.push_from = msg.push_from
            elif isinstance(msg, InferenceInput):
                # the client sends only the step we wait for (or, late, one a push delivered)
                if not session.check_step_number(msg.step, limit=1):
                    continue
                _check_positions(msg.hidden_states, msg.positions)
                item = StepInput(msg.hidden_states, msg.positions, msg.keep)
                session.deliver(msg.step, item, limit=limit)
            else:
                raise ProtocolError(f"inference: {msg.TAG!r} after the session opened")

    async def _next_input(self, stream: ServerStream, session: Session) -> StepInput | None:
        """The input of the session's next step, from the client or a push, waiting up to
        ``step_timeout``; None once the client ended the stream. The client's messages are
        taken here as they arrive (the stream wakes the session: `Session.wake`), so an
        input from the client reaches its step without a task in between.

        Raises `SessionError` when the input does not arrive in time, and what
        `_take_messages` raises for a bad message.
        """
        step, timeout = session.next_step, self.config.step_timeout
        deadline, waited = trio.current_time() + timeout, False
        while True:
            if not self._take_messages(stream, session):
                return None
            item = session.take_input(step)
            if item is not None:
                if not waited:  # one schedule point per step (its sends may make none)
                    await trio.lowlevel.checkpoint()
                return item
            if not await session.wait_arrival(deadline):
                raise SessionError(f"input of step {step} did not arrive within {timeout:.1f}s")
            waited = True

    async def _process_steps(
        self, stream: ServerStream, session: Session, nursery: trio.Nursery
    ) -> None:
        """Run the session's steps in order until the client ends the stream."""
        while True:
            step = session.next_step
            item = await self._next_input(stream, session)
            if item is None:
                return
            if item.keep is not None:
                session.roll_back(item.keep)
            session.begin_step(step)
            out = await self.compute(
                session.span, item.hidden, item.positions, session.cache, Priority.INFERENCE
            )
            target = session.push_to
            if target is not None and not await self._push_at_once(target, step, out, item):
                nursery.start_soon(self._push, target, step, out, item)
                await trio.sleep(0)  # the push leaves first: it is on the critical path
            receipt = self._receipt(session.layers, session.session_id, step, item.hidden, out)
            await stream.send(InferenceStepResult(step, out, receipt))

    async def _push_at_once(
        self, target: PushTarget, step: int, hidden: torch.Tensor, item: StepInput
    ) -> bool:
        """Push from the step's own task where that cannot wait: over a live connection
        whose channel takes the message at once (`notify_push_at_once`), so that a slow
        next hop never holds up our answer to the client. False: `_push` must do it in a
        task of its own (no live connection, a large message, a busy or full channel, or
        a failed attempt, which it dials again for)."""
        conn = self.pool.get_live(target.host, target.port, target.peer_id)
        if conn is None:
            return False
        request = PushRequest(target.session_id, step, hidden, item.positions, item.keep)
        try:
            return await notify_push_at_once(conn, request, timeout=self.config.push_timeout)
        except SwarmError as exc:
            log.info("push of step %d to %s failed at once: %s", step, target.peer_id, exc)
            return False

    async def _push(
        self, target: PushTarget, step: int, hidden: torch.Tensor, item: StepInput
    ) -> None:
        request = PushRequest(target.session_id, step, hidden, item.positions, item.keep)
        with trio.move_on_after(self.config.push_timeout):
            try:
                conn = await self.pool.get(target.host, target.port, target.peer_id)
                # one-way: an acknowledgement would cost both servers a wake-up per step, and
                # a lost push is covered by the client, which sends the input itself
                await notify_push(conn, request)
                return
            except SwarmError as exc:
                log.info("push of step %d to %s failed: %s", step, target.peer_id, exc)
                return
        log.info("push of step %d to %s timed out", step, target.peer_id)

    def rpc_push(self, request: PushRequest, ctx: CallContext) -> None:
        """The previous server's output for one step of a session of ours (one-way; it
        never waits, so it runs as the push arrives: `OneWay.bind_now`)."""
        self.take_push(request, ctx)

    def take_push(self, request: PushRequest, ctx: CallContext) -> bool:
        """Deliver a pushed input into its session: True if taken, False for a duplicate or
        late one. Raises `RemoteError` (forbidden) for a sender the session does not name."""
        session = self.sessions.get(request.session_id)
        if session.push_from is None or ctx.peer_id != session.push_from:
            raise RemoteError(
                ErrorCode.FORBIDDEN, "this session takes pushes only from the peer it names"
            )
        _check_positions(request.hidden_states, request.positions)
        item = StepInput(request.hidden_states, request.positions, request.keep)
        limit = self.sessions.limits.max_pending_steps
        try:
            fresh = session.check_step_number(request.step, limit=limit)
            return fresh and session.deliver(request.step, item, limit=limit)
        except (LimitExceeded, SessionError) as exc:
            log.debug("push of step %d dropped: %s", request.step, exc)
            return False

    def _receipt(
        self, layers: LayerRange, session_id: bytes, step: int, x: torch.Tensor, out: torch.Tensor
    ) -> Receipt:
        """Our signed statement of this computation (`swarm.verify.receipts`)."""
        return make_receipt(
            self.pool.identity, self.state.model_id, layers, session_id, step, x, out
        )

    def _narrow(self, layers: LayerRange) -> Span:
        if layers == self.span.layers:
            return self.span
        if layers.start < self.span.layers.start or layers.stop > self.span.layers.stop:
            moved = self.state.last_move
            if moved is not None and moved.from_range.start <= layers.start < layers.stop <= (
                moved.from_range.stop
            ):  # a client that read our old announcement: not its fault, nor ours
                raise RemoteError(
                    ErrorCode.UNAVAILABLE, f"this server moved from {moved.from_range} to "
                    f"{moved.to_range}; ask another"
                )  # fmt: skip
            raise ShardError(f"layers {layers} are not inside this server's {self.span.layers}")
        return self.span.narrow(layers)
