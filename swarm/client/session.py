"""`InferenceSession`: one generation's pipeline through a chain of servers, with recovery.

The session plans a route, opens one ``inference`` stream per hop and wires each hop's push
target to the next hop. A step sends its input to the first hop; with push on, the servers
pass the hidden states along themselves and the client only collects every hop's output
(sending hop k+1's input itself when its result is ``push_grace`` late); with push off, the
client relays every hop's input. Each hop's inputs are kept (its history).

When a hop fails (its stream errors or closes, or it misses ``step_timeout``), the session
bans the server, re-plans that hop's layers without banned servers, opens replacement
sessions starting at the last finished step, replays the history there as one multi-token
step, points the previous hop's pushes at the replacement and redoes the current step. The
caller sees the same hidden states as if nothing had failed.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import torch
import trio

from swarm.client.bans import BanList
from swarm.client.config import ClientConfig
from swarm.client.discovery import ServerDirectory
from swarm.client.routing import Hop, plan_route
from swarm.errors import (
    DeadlineExceeded,
    ErrorCode,
    ProtocolError,
    RemoteError,
    RoutingError,
    SessionError,
    TransportError,
    VerificationError,
)
from swarm.net.messages import (
    InferenceOpen,
    InferenceReady,
    InferenceStep,
    InferenceStepResult,
    PushTarget,
    Receipt,
)
from swarm.net.pool import ConnectionPool
from swarm.net.rpc import RpcStream
from swarm.types import LayerRange, PeerId, parse_address
from swarm.verify.receipts import check_receipt

__all__ = ["HopFailure", "HopProgress", "InferenceSession", "SessionStatistics"]

log = logging.getLogger(__name__)



class HopFailure(Exception):
    """Internal: one hop failed in a way another server may not (carries the cause)."""

    def __init__(self, hop: Hop, cause: BaseException) -> None:
        super().__init__(f"{hop.server.peer_id} ({hop.server.address}, layers {hop.layers}): "
                         f"{type(cause).__name__}: {cause}")  # fmt: skip
        self.hop = hop
        self.cause = cause


@dataclass
class _HopState:
    """One open sub-session: its stream, the step it started at and its input history."""

    hop: Hop
    session_id: bytes
    stream: RpcStream
    stack: AsyncExitStack
    first_step: int
    push_to: PushTarget | None = None
    last_receipt: Receipt | None = None
    inputs: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)  # what the hop returned, per entry
    receipts: list[Receipt | None] = field(default_factory=list)  # the hop's signed receipts
    seconds: list[float] = field(default_factory=list)

    @property
    def target(self) -> PushTarget:
        host, port = parse_address(self.hop.server.address)
        return PushTarget(self.hop.server.peer_id, host, port, self.session_id)


@dataclass(frozen=True)
class HopProgress:
    """Where one hop of a session stands after its last step (what verification reads)."""

    hop: Hop
    steps: int  # entries in its history (a replay counts as one)
    last_input: tuple[torch.Tensor, torch.Tensor] | None  # (batch, n, hidden), (batch, n)
    last_receipt: Receipt | None  # the server's signed receipt for its last step
    last_seconds: float | None  # how long its last step took


@dataclass(frozen=True)
class SessionStatistics:
    steps: int
    recoveries: int
    failures: tuple[str, ...]
    hop_seconds: tuple[tuple[float, ...], ...]


class InferenceSession:
    """A pipeline through servers covering ``layers``; make one with `InferenceSession.open`.

    `step` takes hidden states ``(batch, new_tokens, hidden)`` and positions ``(batch,
    new_tokens)`` and returns the last hop's output as float32. Not safe for concurrent
    `step` calls (steps are ordered by nature).
    """

    def __init__(
        self,
        pool: ConnectionPool,
        directory: ServerDirectory,
        config: ClientConfig,
        layers: LayerRange,
        max_length: int,
        batch_size: int,
        bans: BanList,
        rng: random.Random,
    ) -> None:
        self.pool = pool
        self.directory = directory
        self.config = config
        self.layers = layers
        self.max_length = max_length
        self.batch_size = batch_size
        self.bans = bans
        self.rng = rng
        self._hops: list[_HopState] = []
        self.step_count = 0
        self.recoveries = 0
        self.failures: list[str] = []
        self.routes: list[list[Hop]] = []
        self.excluded: set[PeerId] = set()  # never routed to (verification bans)

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        pool: ConnectionPool,
        directory: ServerDirectory,
        config: ClientConfig,
        *,
        layers: LayerRange,
        max_length: int,
        batch_size: int = 1,
        bans: BanList | None = None,
        rng: random.Random | None = None,
        excluded: Collection[PeerId] = (),
    ) -> AsyncIterator[InferenceSession]:
        """Plan a route and open every hop; end every hop's stream on exit.

        ``excluded`` peers are never routed to (peers banned by verification).
        Raises `RoutingError` if no route covers ``layers``, `SessionError` if more than
        ``config.max_open_retries`` servers failed while opening.
        """
        bans = bans or BanList(config.ban_base_s, config.ban_backoff, config.ban_max_s)
        session = cls(
            pool, directory, config, layers, max_length, batch_size, bans, rng or random.Random()
        )
        session.excluded = set(excluded)
        try:
            session._hops = await session._open_range(layers, 0, None, None)
            session.routes.append(session.route)
            yield session
        finally:
            with trio.CancelScope(shield=True):
                await session.aclose()

    @property
    def route(self) -> list[Hop]:
        """The hops in use now."""
        return [state.hop for state in self._hops]

    def hop_history(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hop ``k``'s whole history: inputs ``(batch, T, hidden)``, positions ``(batch, T)``
        and the outputs it returned ``(batch, T, hidden)``, in the order they were sent."""
        state = self._hops[k]
        x = torch.cat([h.float() for h, _ in state.inputs], dim=1)  # (batch, T, hidden)
        pos = torch.cat([p for _, p in state.inputs], dim=1)  # (batch, T)
        out = torch.cat([o.float() for o in state.outputs], dim=1)  # (batch, T, hidden)
        return x, pos, out

    def hop_progress(self, k: int) -> HopProgress:
        """Hop ``k``'s last step: its input, receipt and time (see `hop_history` for all)."""
        state = self._hops[k]
        return HopProgress(
            hop=state.hop,
            steps=len(state.inputs),
            last_input=state.inputs[-1] if state.inputs else None,
            last_receipt=state.receipts[-1] if state.receipts else None,
            last_seconds=state.seconds[-1] if state.seconds else None,
        )

    def statistics(self) -> SessionStatistics:
        return SessionStatistics(
            steps=self.step_count,
            recoveries=self.recoveries,
            failures=tuple(self.failures),
            hop_seconds=tuple(tuple(state.seconds) for state in self._hops),
        )

    async def aclose(self) -> None:
        """End every hop's stream (quietly: a dead hop has nothing left to close)."""
        hops, self._hops = self._hops, []
        for state in hops:
            await _close_hop(state)

    # ---- steps ----

    async def step(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Run one step through every hop; returns ``(batch, new_tokens, hidden)`` float32.

        Raises `SessionError` when a hop failed and could not be replaced (or refused our
        input as malformed), `RoutingError` when no servers are left for a failed hop's layers.
        """
        if hidden.dim() != 3 or hidden.shape[0] != self.batch_size:
            raise SessionError(f"hidden states must be ({self.batch_size}, seq, hidden)")
        step = self.step_count
        x = hidden.to(self.config.torch_wire_dtype)  # (batch, seq, hidden)
        k, explicit = 0, True
        while k < len(self._hops):
            state = self._hops[k]
            send_now = explicit or not self.config.use_push
            try:
                out = await self._hop_step(state, step, x, positions, send_now)
            except HopFailure as failure:
                await self._recover(k, step, failure)
                explicit = True
                continue
            state.inputs.append((x, positions))
            state.outputs.append(out)
            state.receipts.append(state.last_receipt)
            x = out.to(self.config.torch_wire_dtype)
            k, explicit = k + 1, False
        self.step_count += 1
        return x.float()

    async def _hop_step(
        self, state: _HopState, step: int, x: torch.Tensor, pos: torch.Tensor, send_now: bool
    ) -> torch.Tensor:
        """One hop's output for ``step``. Raises `HopFailure` or `SessionError`."""
        started = trio.current_time()
        try:
            if send_now:
                await state.stream.send(InferenceStep(step, x, pos))
            else:
                try:
                    result = await state.stream.receive(
                        InferenceStepResult, timeout=self.config.push_grace
                    )
                    return self._check_result(state, step, x, result, started)
                except DeadlineExceeded:
                    log.info("no pushed result from %s in %.3f s; sending the input",
                             state.hop.server.peer_id, self.config.push_grace)  # fmt: skip
                    await state.stream.send(InferenceStep(step, x, pos))
            result = await state.stream.receive(
                InferenceStepResult, timeout=self.config.step_timeout
            )
            return self._check_result(state, step, x, result, started)
        except trio.EndOfChannel as exc:
            raise HopFailure(state.hop, ProtocolError("the server ended the stream")) from exc
        except RemoteError as exc:
            if exc.code is ErrorCode.BAD_REQUEST:  # our request: another server would refuse it too
                raise SessionError(
                    f"{state.hop.server.address} refused step {step}: {exc}"
                ) from exc
            raise HopFailure(state.hop, exc) from exc
        except (TransportError, ProtocolError) as exc:
            raise HopFailure(state.hop, exc) from exc

    def _check_result(
        self,
        state: _HopState,
        step: int,
        x: torch.Tensor,
        result: InferenceStepResult,
        started: float,
    ) -> torch.Tensor:
        if result.step != step:
            raise ProtocolError(f"result for step {result.step}, expected step {step}")
        out = result.hidden_states  # (batch, seq, hidden)
        if tuple(out.shape) != tuple(x.shape) or not out.is_floating_point():
            raise ProtocolError(
                f"result of shape {list(out.shape)} {out.dtype}, expected {list(x.shape)}"
            )
        if self.config.policy.checks_receipts:  # receipts cost a hash and a signature check
            try:
                check_receipt(result.receipt, state.hop.server.peer_id, layers=state.hop.layers,
                              step=step, outputs=out)  # fmt: skip
            except VerificationError as exc:
                raise ProtocolError(f"bad receipt: {exc}") from exc
        state.last_receipt = result.receipt
        state.seconds.append(trio.current_time() - started)
        return out

    # ---- opening hops ----

    async def _plan(self, layers: LayerRange) -> list[Hop]:
        """A route for ``layers`` without banned servers (asks the directory again once)."""
        for refresh in (False, True):
            servers = await self.directory.servers(refresh=refresh)
            try:
                return plan_route(
                    servers,
                    layers,
                    client_pings=self.directory.pings,
                    cache_tokens_needed=self.max_length * self.batch_size,
                    banned=self.bans.banned() | self.excluded,
                    rng=self.rng,
                )
            except RoutingError as exc:
                error = exc
        banned = len(self.bans.banned())
        raise RoutingError(f"{error} ({banned} servers banned after failures)") from error

    async def _open_range(
        self,
        layers: LayerRange,
        first_step: int,
        next_target: PushTarget | None,
        push_from: PeerId | None,
    ) -> list[_HopState]:
        """Open sub-sessions covering ``layers``, pushing on to ``next_target``; the first
        takes pushes from ``push_from`` only (the server before ``layers``; None: none).

        A server that fails to open is banned and the rest of the range re-planned, up to
        ``max_open_retries`` times. Raises `RoutingError` or `SessionError`.
        """
        opened: list[_HopState] = []
        start, failures = layers.start, 0
        try:
            while start < layers.stop:
                plan = await self._plan(LayerRange(start, layers.stop))
                before = opened[-1].hop.server.peer_id if opened else push_from
                states, failure = await self._open_plan(plan, first_step, next_target, before)
                opened += states
                start = states[-1].hop.layers.stop if states else start
                if failure is not None:
                    failures += 1
                    self._ban(failure)
                    if failures > self.config.max_open_retries:
                        raise SessionError(
                            f"{failures} servers failed while opening layers {layers}; "
                            f"last: {failure}"
                        ) from failure.cause
            await self._wire_pushes(opened, next_target, first_step)
        except BaseException:
            with trio.CancelScope(shield=True):
                for state in opened:
                    await _close_hop(state)
            raise
        return opened

    async def _open_plan(
        self,
        plan: list[Hop],
        first_step: int,
        next_target: PushTarget | None,
        push_from: PeerId | None,
    ) -> tuple[list[_HopState], HopFailure | None]:
        """Open every hop of ``plan`` at once (one round trip, not one per hop).

        Returns the opened prefix of the plan and the first failure, if any; hops opened
        after a failed one are closed again (the rest of the range is planned anew).
        """
        ids = [os.urandom(16) for _ in plan]
        results: list[_HopState | HopFailure | None] = [None] * len(plan)

        async def one(i: int) -> None:
            push_to = _target(plan[i + 1], ids[i + 1]) if i + 1 < len(plan) else next_target
            pusher = plan[i - 1].server.peer_id if i > 0 else push_from
            try:
                results[i] = await self._open_hop(plan[i], ids[i], push_to, pusher, first_step)
            except HopFailure as failure:
                results[i] = failure

        try:
            async with trio.open_nursery() as nursery:
                for i in range(len(plan)):
                    nursery.start_soon(one, i)
        except BaseException:
            with trio.CancelScope(shield=True):
                for result in results:
                    if isinstance(result, _HopState):
                        await _close_hop(result)
            raise
        opened: list[_HopState] = []
        failure: HopFailure | None = None
        for result in results:
            if failure is None and isinstance(result, _HopState):
                opened.append(result)
            elif failure is None and isinstance(result, HopFailure):
                failure = result
            elif isinstance(result, _HopState):
                with trio.CancelScope(shield=True):
                    await _close_hop(result)
        return opened, failure

    async def _open_hop(
        self,
        hop: Hop,
        session_id: bytes,
        push_to: PushTarget | None,
        push_from: PeerId | None,
        first_step: int,
    ) -> _HopState:
        """Dial, open the stream, wait for `InferenceReady`. Raises `HopFailure`."""
        cfg = self.config
        host, port = parse_address(hop.server.address)
        stack = AsyncExitStack()
        try:
            with trio.move_on_after(cfg.connect_timeout) as scope:
                conn = await self.pool.get(host, port, hop.server.peer_id)
            if scope.cancelled_caught:
                raise DeadlineExceeded(f"connecting took over {cfg.connect_timeout} s")
            stream = await stack.enter_async_context(
                conn.open_stream("inference", timeout=cfg.step_timeout)
            )
            await stream.send(
                InferenceOpen(
                    session_id=session_id,
                    max_length=self.max_length,
                    batch_size=self.batch_size,
                    dtype=cfg.wire_dtype,
                    layer_range=hop.layers,
                    push_to=push_to if cfg.use_push else None,
                    first_step=first_step,
                    push_from=push_from if cfg.use_push else None,
                )
            )
            ready = await stream.receive(InferenceReady, timeout=cfg.request_timeout)
            if ready.session_id != session_id:
                raise ProtocolError("InferenceReady names another session")
        except trio.EndOfChannel as exc:
            await stack.aclose()
            raise HopFailure(hop, ProtocolError("the server ended the stream")) from exc
        except (TransportError, ProtocolError, RemoteError) as exc:
            await stack.aclose()
            raise HopFailure(hop, exc) from exc
        except BaseException:
            await stack.aclose()
            raise
        state = _HopState(hop, session_id, stream, stack, first_step)
        state.push_to = push_to if cfg.use_push else None
        return state

    async def _wire_pushes(
        self, states: Sequence[_HopState], next_target: PushTarget | None, step: int
    ) -> None:
        """Point each hop's pushes at the hop after it, where they point elsewhere."""
        if not self.config.use_push:
            return
        for i, state in enumerate(states):
            want = states[i + 1].target if i + 1 < len(states) else next_target
            if want is not None and state.push_to != want:
                await self._set_push(state, want, step)

    async def _set_push(self, state: _HopState, target: PushTarget, step: int) -> None:
        """Best effort: a hop that cannot take the news fails its next step instead."""
        try:
            await state.stream.send(InferenceStep(step, push_to=target))
            state.push_to = target
        except TransportError as exc:
            log.info("could not update the push target of %s: %s", state.hop.server.peer_id, exc)

    async def _set_pusher(self, state: _HopState, peer: PeerId, step: int) -> None:
        """Tell a hop whose predecessor changed whose pushes to take (best effort)."""
        try:
            await state.stream.send(InferenceStep(step, push_from=peer))
        except TransportError as exc:
            log.info("could not update the pusher of %s: %s", state.hop.server.peer_id, exc)

    def _ban(self, failure: HopFailure) -> None:
        seconds = self.bans.ban(failure.hop.server.peer_id)
        self.failures.append(str(failure))
        log.warning("banning %s for %.0f s: %s", failure.hop.server.peer_id, seconds, failure)

    # ---- recovery ----

    async def _recover(self, k: int, step: int, failure: HopFailure) -> None:
        """Replace hop ``k`` (failed at ``step``) by new hops that hold the same cache.

        Raises `SessionError` past ``max_recoveries``, `RoutingError` with no servers left.
        """
        while True:
            self._ban(failure)
            self.recoveries += 1
            if self.recoveries > self.config.max_recoveries:
                raise SessionError(
                    f"gave up after {self.recoveries - 1} recoveries; last failure: {failure}"
                ) from failure.cause
            try:
                await self._replace(k, step)
                return
            except HopFailure as again:
                failure = again

    async def _replace(self, k: int, step: int) -> None:
        """Open replacements for hop ``k``, replay its history, splice them in."""
        failed = self._hops[k]
        next_target = self._hops[k + 1].target if k + 1 < len(self._hops) else None
        before = self._hops[k - 1].hop.server.peer_id if k > 0 else None
        replay_step = step - 1 if failed.inputs else step
        new = await self._open_range(failed.hop.layers, replay_step, next_target, before)
        try:
            if failed.inputs:
                x = torch.cat([h for h, _ in failed.inputs], dim=1)  # (batch, history, hidden)
                pos = torch.cat([p for _, p in failed.inputs], dim=1)  # (batch, history)
                for state in new:
                    out = await self._hop_step(state, replay_step, x, pos, send_now=True)
                    state.inputs.append((x, pos))
                    state.outputs.append(out)
                    state.receipts.append(state.last_receipt)
                    x = out.to(self.config.torch_wire_dtype)
        except BaseException:
            with trio.CancelScope(shield=True):
                for state in new:
                    await _close_hop(state)
            raise
        self._hops[k : k + 1] = new
        await _close_hop(failed)
        if k > 0:
            await self._set_push(self._hops[k - 1], new[0].target, step)
        after = k + len(new)
        if after < len(self._hops) and self.config.use_push:
            await self._set_pusher(self._hops[after], new[-1].hop.server.peer_id, step)
        self.routes.append(self.route)
        log.info("replaced %s with %d hop(s) at step %d", failed.hop.server.peer_id, len(new), step)


def _target(hop: Hop, session_id: bytes) -> PushTarget:
    host, port = parse_address(hop.server.address)
    return PushTarget(hop.server.peer_id, host, port, session_id)


async def _close_hop(state: _HopState) -> None:
    """End the hop's stream; never raises for a hop that is already gone."""
    with trio.move_on_after(1.0, shield=True):
        try:
            if not state.stream.finished:
                await state.stream.send_end()
        except TransportError:
            pass
        try:
            await state.stack.aclose()
        except TransportError:
            pass
