"""One hop of a chain: a sub-session on one server (`HopState`), what it was sent and what it
answered (`HopHistory`), one step on it (`run_step`), its push wiring (`rewire`) and closing it.

Opening hops is `swarm.client.chain.opening`; the chain that owns them, `Chain`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

import torch
import trio

from swarm.client.config import ClientConfig
from swarm.client.routing import Hop
from swarm.errors import (
    DeadlineExceeded,
    ErrorCode,
    ProtocolError,
    RemoteError,
    SessionError,
    TransportError,
    VerificationError,
)
from swarm.net.messages import (
    InferenceInput,
    InferenceStepResult,
    NewPusher,
    NewPushTarget,
    PushTarget,
    Receipt,
)
from swarm.net.methods import TypedStream
from swarm.net.surface import InferenceDown, InferenceUp
from swarm.types import parse_address
from swarm.verify.receipts import check_receipt

__all__ = [
    "HistoryView",
    "HopFailure",
    "HopHistory",
    "HopState",
    "StepAnswer",
    "StepCall",
    "close_hop",
    "push_target",
    "rewire",
    "run_step",
]

log = logging.getLogger(__name__)


class HopFailure(Exception):
    """Internal: one hop failed in a way another server may not (carries the cause)."""

    def __init__(self, hop: Hop, cause: BaseException) -> None:
        super().__init__(
            f"{hop.server.peer_id} ({hop.server.address}, layers {hop.layers}): "
            f"{type(cause).__name__}: {cause}"
        )
        self.hop = hop
        self.cause = cause


@dataclass(frozen=True)
class StepAnswer:
    """A hop's checked answer to one step."""

    out: torch.Tensor  # (batch, seq, hidden), as the server sent it
    receipt: Receipt | None  # the server's signed receipt
    seconds: float  # from the start of the step's wait to the answer


@dataclass(frozen=True)
class HistoryView:
    """A hop's history up to one step (its first ``entries`` entries), concatenated on
    demand: what verification re-runs and what a replacement replays."""

    history: HopHistory
    entries: int

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inputs ``(batch, T, hidden)``, positions ``(batch, T)`` and outputs ``(batch, T,
        hidden)`` (float32), in the order they were sent."""
        return self.history.tensors(self.entries)


class HopHistory:
    """Every entry a hop answered (a step, or a replay counting as one), oldest first.

    `tensors` concatenates lazily and keeps what it built, so checking every step costs one
    copy of the new entries, not of the whole history. Speculative decoding cuts the last
    entry back to the accepted length (`truncate`), as the server does its cache.
    """

    def __init__(self) -> None:
        self.inputs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (batch, n, hidden), (batch, n)
        self.outputs: list[torch.Tensor] = []  # what the hop returned, per entry
        self.receipts: list[Receipt | None] = []  # the hop's signed receipts
        self.seconds: list[float] = []
        self._ends: list[int] = []  # positions held after each entry (no sum per step)
        self._built: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._built_entries = 0

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def tokens(self) -> int:
        """Positions the hop's cache holds."""
        return self._ends[-1] if self._ends else 0

    def record(self, x: torch.Tensor, positions: torch.Tensor, answer: StepAnswer) -> None:
        """Append one answered entry (input ``(batch, n, hidden)``, positions ``(batch, n)``)."""
        self.inputs.append((x, positions))
        self.outputs.append(answer.out)
        self.receipts.append(answer.receipt)
        self.seconds.append(answer.seconds)
        self._ends.append(self.tokens + x.shape[1])

    def truncate(self, tokens: int) -> None:
        """Keep only the first ``tokens`` positions, cutting the tail of the last entry (its
        drafted tokens that were not accepted; its receipt still covers the whole step).

        Raises:
            SessionError: ``tokens`` is before the last entry or past the history.
        """
        total = self.tokens
        if tokens == total:
            return
        last = self.inputs[-1][0].shape[1] if self.inputs else 0
        if not total - last <= tokens < total:
            raise SessionError(
                f"cannot cut a history of {total} positions to {tokens}: only the last "
                f"step's {last} can go"
            )
        keep = tokens - (total - last)
        if keep == 0:
            for kept in (self.inputs, self.outputs, self.receipts, self.seconds, self._ends):
                kept.pop()
        else:
            x, positions = self.inputs[-1]
            self.inputs[-1] = (x[:, :keep], positions[:, :keep])
            self.outputs[-1] = self.outputs[-1][:, :keep]
            self._ends[-1] = tokens
        if self._built_entries >= len(self.inputs):
            self._built, self._built_entries = None, 0  # it holds the cut tail

    def view(self) -> HistoryView:
        """The history as it stands now (later entries stay out of the view)."""
        return HistoryView(self, len(self))

    def tensors(self, entries: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first ``entries`` entries concatenated (see `HistoryView.tensors`)."""
        if not 0 < entries <= len(self):
            raise ValueError(f"history has {len(self)} entries, asked for {entries}")
        if self._built is None or self._built_entries < entries:
            new = range(self._built_entries, len(self))
            parts = [self._built] if self._built is not None else []
            x = torch.cat([p[0] for p in parts] + [self.inputs[i][0].float() for i in new], 1)
            pos = torch.cat([p[1] for p in parts] + [self.inputs[i][1] for i in new], 1)
            out = torch.cat([p[2] for p in parts] + [self.outputs[i].float() for i in new], 1)
            self._built, self._built_entries = (x, pos, out), len(self)
        x, pos, out = self._built
        tokens = self._ends[entries - 1]
        return x[:, :tokens], pos[:, :tokens], out[:, :tokens]

    def step_times(self, last: int | None = None) -> list[tuple[int, float]]:
        """``(tokens, seconds)`` of every entry (or of the ``last`` ones), oldest first."""
        start = 0 if last is None else max(0, len(self.inputs) - last)
        entries = zip(self.inputs[start:], self.seconds[start:], strict=True)
        return [(x.shape[1], s) for (x, _), s in entries]


@dataclass
class HopState:
    """One open sub-session: its stream, the step it started at, where it pushes, and its
    history."""

    hop: Hop
    session_id: bytes
    stream: TypedStream[InferenceUp, InferenceDown]
    stack: AsyncExitStack
    first_step: int
    push_to: PushTarget | None = None
    history: HopHistory = field(default_factory=HopHistory)

    @property
    def target(self) -> PushTarget:
        return push_target(self.hop, self.session_id)


def push_target(hop: Hop, session_id: bytes) -> PushTarget:
    host, port = parse_address(hop.server.address)
    return PushTarget(hop.server.peer_id, host, port, session_id)


async def run_step(
    state: HopState,
    config: ClientConfig,
    step: int,
    x: torch.Tensor,
    positions: torch.Tensor,
    *,
    send_now: bool,
    grace: float,
    keep: int | None = None,
) -> StepAnswer:
    """Hop ``state``'s answer to ``step`` (not recorded: the caller decides whether it counts).

    With ``send_now`` the input is sent at once; otherwise it is expected by push and sent
    only if no answer came within ``grace`` seconds. ``keep``: the server's cache keeps its
    first ``keep`` tokens before the step (rejected drafts of the step before go). Waits up
    to ``config.step_timeout`` after sending. Raises `HopFailure`, or `SessionError` when
    the server refused our input as malformed (another server would refuse it too).
    """
    answer = await StepCall(state, config, step, x, positions, keep).answer(send_now, grace)
    assert answer is not None  # no ``within``: an answer or an error
    return answer


class StepCall:
    """One step on one hop (`run_step`), waited for in pieces: a hedged step first waits
    here for an answer within its deadline, and only a late one goes on in a race beside a
    replacement (`swarm.client.chain.hedging`), its input already sent."""

    def __init__(
        self,
        state: HopState,
        config: ClientConfig,
        step: int,
        x: torch.Tensor,
        positions: torch.Tensor,
        keep: int | None = None,
    ) -> None:
        self.state, self.config, self.step = state, config, step
        self.x, self.positions, self.keep = x, positions, keep
        self.started = trio.current_time()  # an answer's seconds count from here
        self.sent = False  # whether our input went out (then a push is no longer awaited)

    async def answer(
        self, send_now: bool, grace: float, within: float | None = None
    ) -> StepAnswer | None:
        """The hop's answer (as `run_step`); with ``within``, None when none came within
        that many seconds of the call's start (the input is sent by then if ``grace`` ends
        first; a later `answer` goes on waiting). Raises what `run_step` raises."""
        state = self.state
        try:
            if not self.sent and not send_now:
                try:
                    return self._check(await self._receive(grace, within))
                except DeadlineExceeded:
                    if within is not None and grace > within:
                        return None  # late before the push's grace ended: nothing sent
                    log.info(
                        "no pushed result from %s in %.3f s; sending the input",
                        state.hop.server.peer_id,
                        grace,
                    )
            if not self.sent:
                message = InferenceInput(self.step, self.x, self.positions, self.keep)
                await state.stream.send(message)
                self.sent = True
            try:
                return self._check(await self._receive(self.config.step_timeout, within))
            except DeadlineExceeded:
                if within is None:
                    raise
                return None
        except trio.EndOfChannel as exc:
            raise HopFailure(state.hop, ProtocolError("the server ended the stream")) from exc
        except RemoteError as exc:
            if exc.code is ErrorCode.BAD_REQUEST:
                address = state.hop.server.address
                raise SessionError(f"{address} refused step {self.step}: {exc}") from exc
            raise HopFailure(state.hop, exc) from exc
        except (TransportError, ProtocolError) as exc:
            raise HopFailure(state.hop, exc) from exc

    async def _receive(self, timeout: float, within: float | None) -> InferenceStepResult:
        if within is not None:
            timeout = max(0.0, min(timeout, self.started + within - trio.current_time()))
        return await self.state.stream.receive(InferenceStepResult, timeout=timeout)

    def _check(self, result: InferenceStepResult) -> StepAnswer:
        return _check(self.state, self.config, self.step, self.x, result, self.started)


def _check(
    state: HopState,
    config: ClientConfig,
    step: int,
    x: torch.Tensor,
    result: InferenceStepResult,
    started: float,
) -> StepAnswer:
    if result.step != step:
        raise ProtocolError(f"result for step {result.step}, expected step {step}")
    out = result.hidden_states  # (batch, seq, hidden)
    if tuple(out.shape) != tuple(x.shape) or not out.is_floating_point():
        raise ProtocolError(
            f"result of shape {list(out.shape)} {out.dtype}, expected {list(x.shape)}"
        )
    if config.policy.checks_receipts:  # receipts cost a hash and a signature check
        try:
            check_receipt(
                result.receipt,
                state.hop.server.peer_id,
                layers=state.hop.layers,
                step=step,
                outputs=out,
            )
        except VerificationError as exc:
            raise ProtocolError(f"bad receipt: {exc}") from exc
    return StepAnswer(out, result.receipt, trio.current_time() - started)


async def rewire(
    states: Sequence[HopState],
    next_target: PushTarget | None,
    *,
    pusher_of: HopState | None = None,
) -> None:
    """Point each hop's pushes at the hop after it (the last one's at ``next_target``) where
    they point elsewhere, and tell ``pusher_of`` (the hop after ``states``) to take pushes
    from the last of them. The one place where push wiring changes. Best effort: a hop that
    cannot take the news fails its next step instead."""
    for i, state in enumerate(states):
        want = states[i + 1].target if i + 1 < len(states) else next_target
        if want is not None and state.push_to != want:
            try:
                await state.stream.send(NewPushTarget(want))
                state.push_to = want
            except TransportError as exc:
                peer = state.hop.server.peer_id
                log.info("could not update the push target of %s: %s", peer, exc)
    if pusher_of is not None and states:
        peer = states[-1].hop.server.peer_id
        try:
            await pusher_of.stream.send(NewPusher(peer))
        except TransportError as exc:
            log.info("could not update the pusher of %s: %s", pusher_of.hop.server.peer_id, exc)


async def close_hop(state: HopState) -> None:
    """End the hop's stream; never raises for a hop that is already gone, never waits for
    the server (a stopped one cannot answer) beyond one second."""
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
