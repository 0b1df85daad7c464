"""One hop of an inference session: a sub-session on one server, what it was sent and what it
answered (`HopState`), one step on it (`run_step`), its push wiring and closing it.

Opening hops is `swarm.client.opening`; replacing them, `swarm.client.recovery`.
"""

from __future__ import annotations

import logging
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
from swarm.net.messages import InferenceStep, InferenceStepResult, PushTarget, Receipt
from swarm.net.rpc import RpcStream
from swarm.types import PeerId, parse_address
from swarm.verify.receipts import check_receipt

__all__ = [
    "HopFailure",
    "HopState",
    "StepAnswer",
    "close_hop",
    "push_target",
    "run_step",
    "set_push",
    "set_pusher",
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


@dataclass
class HopState:
    """One open sub-session: its stream, the step it started at and its history (one entry
    per step it answered, a replay counting as one)."""

    hop: Hop
    session_id: bytes
    stream: RpcStream
    stack: AsyncExitStack
    first_step: int
    push_to: PushTarget | None = None
    inputs: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)  # what the hop returned, per entry
    receipts: list[Receipt | None] = field(default_factory=list)  # the hop's signed receipts
    seconds: list[float] = field(default_factory=list)

    @property
    def target(self) -> PushTarget:
        return push_target(self.hop, self.session_id)

    def record(self, x: torch.Tensor, positions: torch.Tensor, answer: StepAnswer) -> None:
        """Append one answered step (input ``(batch, n, hidden)``, positions ``(batch, n)``)."""
        self.inputs.append((x, positions))
        self.outputs.append(answer.out)
        self.receipts.append(answer.receipt)
        self.seconds.append(answer.seconds)

    def step_times(self) -> list[tuple[int, float]]:
        """``(tokens, seconds)`` of every entry, oldest first."""
        return [(x.shape[1], s) for (x, _), s in zip(self.inputs, self.seconds, strict=True)]


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
) -> StepAnswer:
    """Hop ``state``'s answer to ``step`` (not recorded: the caller decides whether it counts).

    With ``send_now`` the input is sent at once; otherwise it is expected by push and sent
    only if no answer came within ``grace`` seconds. Waits up to ``config.step_timeout``
    after sending. Raises `HopFailure`, or `SessionError` when the server refused our input
    as malformed (another server would refuse it too).
    """
    started = trio.current_time()
    try:
        if not send_now:
            try:
                result = await state.stream.receive(InferenceStepResult, timeout=grace)
                return _check(state, config, step, x, result, started)
            except DeadlineExceeded:
                log.info(
                    "no pushed result from %s in %.3f s; sending the input",
                    state.hop.server.peer_id,
                    grace,
                )
        await state.stream.send(InferenceStep(step, x, positions))
        result = await state.stream.receive(InferenceStepResult, timeout=config.step_timeout)
        return _check(state, config, step, x, result, started)
    except trio.EndOfChannel as exc:
        raise HopFailure(state.hop, ProtocolError("the server ended the stream")) from exc
    except RemoteError as exc:
        if exc.code is ErrorCode.BAD_REQUEST:
            address = state.hop.server.address
            raise SessionError(f"{address} refused step {step}: {exc}") from exc
        raise HopFailure(state.hop, exc) from exc
    except (TransportError, ProtocolError) as exc:
        raise HopFailure(state.hop, exc) from exc


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


async def set_push(state: HopState, target: PushTarget, step: int) -> None:
    """Point the hop's pushes at ``target``. Best effort: a hop that cannot take the news
    fails its next step instead."""
    try:
        await state.stream.send(InferenceStep(step, push_to=target))
        state.push_to = target
    except TransportError as exc:
        log.info("could not update the push target of %s: %s", state.hop.server.peer_id, exc)


async def set_pusher(state: HopState, peer: PeerId, step: int) -> None:
    """Tell a hop whose predecessor changed whose pushes to take (best effort)."""
    try:
        await state.stream.send(InferenceStep(step, push_from=peer))
    except TransportError as exc:
        log.info("could not update the pusher of %s: %s", state.hop.server.peer_id, exc)


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
