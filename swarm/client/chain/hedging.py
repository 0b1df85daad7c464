"""Hedged steps: a hop that is late (not failed) races a replacement started in parallel.

Each hop step has an adaptive deadline (`hedge_deadline`): ``hedge_after`` times the hop's
usual time for a step of that many tokens, at least ``hedge_floor``. A hop that has not
answered by then keeps running, and a replacement starts beside it on other servers (the
chain's `Chain.replace`: open the hop's layers, replay its history) and runs the
same step. The first full answer is kept:

- the hop's own: the replacement's sub-sessions are closed (their caches die with them), the
  hop's history gets the step as usual;
- the replacement's: it is spliced in (`Chain.splice`: the hop before pushes to it, the hop
  after takes its pushes), the slow hop is closed and penalised in routing
  (`FailurePolicy.slow`), not banned. Its history holds the replay and the step, the same
  cache it computed.

A hop that fails outright meanwhile is banned as on any failure. With no replacement to be
had, or none answering, the step waits for the hop up to ``step_timeout`` as before; a hop
with no history yet (its first step, the prefill) has no deadline and is not hedged. Both
racers run in one nursery: the winner cancels the other, whose cleanup closes what it opened.

Pushes: during the race the hop before still pushes to the late hop (the replacement gets
its input from the client), and the hop after still takes pushes only from the late hop;
after a replacement won, the client sends the hop after its input itself for this step and
`Chain.splice` rewires both for the next. (If the late hop had pushed this step's output to the
hop after before it stalled, that hop computes on it: the same computation by an honest
server, so equal to the replacement's output up to floating-point rounding.)
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import trio

from swarm.client.chain.hop import (
    HopFailure,
    HopState,
    StepAnswer,
    StepCall,
    close_hop,
    run_step,
)
from swarm.client.config import ClientConfig
from swarm.directory import ServerView
from swarm.errors import DeadlineExceeded, SessionError, SwarmError
from swarm.types import LayerRange, PeerId, ServerState

if TYPE_CHECKING:
    from swarm.client.chain.chain import Chain

__all__ = [
    "HedgeRecord",
    "HedgeWinner",
    "alternative_counts",
    "alternative_seconds",
    "hedge_deadline",
    "step_hop",
    "usual_seconds",
]

log = logging.getLogger(__name__)

WINDOW = 16  # a hop's usual step time is read from its last WINDOW steps
QUANTILE = 0.9  # ... as this quantile: a high one, so that ordinary jitter is inside it


def _quantile(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[round(QUANTILE * (len(ordered) - 1))]


def usual_seconds(times: Sequence[tuple[int, float]], tokens: int) -> float | None:
    """A hop's usual time for a step of ``tokens`` tokens, from its ``(tokens, seconds)``
    history; None with no history.

    Single-token steps give the decode time; multi-token steps (prefill, replays, chat
    turns) a time per token, which scales a multi-token step (never below one decode step).
    Without a sample of the other kind each stands in for it: ``tokens`` decode steps
    overstate a prefill, so the deadline errs late, not early.
    """
    recent = times[-WINDOW:]
    single = [s for n, s in recent if n == 1]
    per_token = [s / n for n, s in recent if n > 1]
    decode = _quantile(single) if single else None
    rate = _quantile(per_token) if per_token else None
    if tokens == 1:
        return decode if decode is not None else rate
    if rate is None:
        return None if decode is None else tokens * decode
    return max(decode or 0.0, tokens * rate)


def hedge_deadline(
    state: HopState, tokens: int, config: ClientConfig, alternative: float | None = None
) -> float | None:
    """Seconds into a step of ``tokens`` tokens after which hop ``state`` is raced by a
    replacement; None: never (hedging off, no history yet, or not before ``step_timeout``).

    The yardstick is the faster of the hop's own usual time and twice ``alternative``, what
    the best other server for its layers should take (`alternative_seconds`): a hop is judged
    against what the swarm can do, not only against its own past, so a server that is
    steadily slow is raced as soon as another could do better, however slow it always was.
    """
    if config.hedging.after is None:
        return None
    usual = usual_seconds(state.history.step_times(WINDOW), tokens)
    if usual is None:
        return None  # a hop's first step (a prompt) is judged by the step timeout alone
    # the alternative counts at twice its estimate: it was announced, not seen, and a loaded
    # machine makes every hop a little slower than its record
    yardstick = usual if alternative is None else min(usual, 2 * alternative)
    deadline = max(config.hedging.floor, config.hedging.after * yardstick)
    return deadline if deadline < config.step_timeout else None


def alternative_counts(state: HopState, tokens: int, config: ClientConfig) -> bool:
    """Whether the best other server's time (`alternative_seconds`) can move hop
    ``state``'s `hedge_deadline` for a step of ``tokens`` tokens: only where the hop's own
    usual time puts the deadline above ``hedging.floor``. Below, the yardstick (at most the
    usual time) leaves it at the floor whatever the alternative, so the step reads no
    records for it (on a fast chain that was a listing of the directory per hop per token)."""
    after = config.hedging.after
    if after is None:
        return False
    usual = usual_seconds(state.history.step_times(WINDOW), tokens)
    return usual is not None and after * usual > config.hedging.floor


def alternative_seconds(
    state: HopState, servers: Sequence[ServerView], tokens: int, pings: Mapping[PeerId, float]
) -> float | None:
    """What the best other online server covering hop ``state``'s layers should take for a
    step of ``tokens`` tokens: its announced throughput scaled to the hop's share of its
    span, plus the client's round trip to it (None: no other server). The caller passes
    only ``servers`` whose records are proven (`Chain.alternative`)."""
    hop = state.hop
    best = None
    for server in servers:
        if (
            server.peer_id == hop.server.peer_id
            or server.state is not ServerState.ONLINE
            or server.throughput <= 0
            or not (
                server.layers.start <= hop.layers.start and hop.layers.stop <= server.layers.stop
            )
        ):
            continue
        share = len(hop.layers) / max(1, len(server.layers))
        seconds = tokens * share / server.throughput + pings.get(server.peer_id, 0.0)
        best = seconds if best is None else min(best, seconds)
    return best


class HedgeWinner(enum.Enum):
    ORIGINAL = "original"  # the late hop answered first
    REPLACEMENT = "replacement"  # the replacement answered first and took the hop's place
    NONE = "none"  # neither: the hop failed (or timed out) and recovery took over


@dataclass(frozen=True)
class HedgeRecord:
    """One hedged step of one hop (`ChainStatistics.hedges`)."""

    step: int
    layers: LayerRange
    slow: PeerId  # the hop's server
    deadline: float  # seconds into the step when the replacement started
    seconds: float | None  # seconds into the step when the kept answer came (None: none)
    winner: HedgeWinner


async def step_hop(
    chain: Chain,
    k: int,
    step: int,
    x: torch.Tensor,
    positions: torch.Tensor,
    *,
    send_now: bool,
    keep: int | None = None,
) -> int:
    """Run ``step`` on hop ``k`` of ``chain`` (input ``(batch, n, hidden)``), hedged when it
    is late, and record it in the history of whichever hop answered; a hedge is appended to
    ``chain.hedges``.

    Returns how many hops now stand where hop ``k`` stood: 1, unless a replacement split its
    layers (the last one's last output is the step's output). Raises `HopFailure` when the
    hop failed and no replacement answered (the caller recovers), `SessionError` when our
    input was refused as malformed.
    """
    config, state = chain.config, chain.hop(k)
    if raced_and_late(chain.hedges, state.hop.server.peer_id, step, config):
        moved = await _move(chain, k, step, x, positions)
        if moved:
            return moved
    tokens = x.shape[1]
    counts = alternative_counts(state, tokens, config)
    alternative = await chain.alternative(k, tokens) if counts else None
    deadline = hedge_deadline(state, tokens, config, alternative)
    if deadline is None:
        answer = await run_step(
            state,
            config,
            step,
            x,
            positions,
            send_now=send_now,
            grace=config.pipeline.push_grace,
            keep=keep,
        )
        state.history.record(x, positions, answer)
        return 1
    race = _Race(chain, k, step, x, positions, keep)
    await race.run(deadline, send_now)
    if race.hedged:
        chain.hedges.append(race.record(deadline))
    return await race.settle()


def raced_and_late(
    hedges: Sequence[HedgeRecord], server: PeerId, step: int, config: ClientConfig
) -> bool:
    """Whether ``server`` was raced and still answered first (the replacement's replay
    wasted) ``hedging.move_after`` times within the last ``hedging.move_window`` steps."""
    limit = config.hedging.move_after
    if limit is None:
        return False
    window = config.hedging.move_window
    late = sum(
        1
        for h in hedges
        if h.slow == server and h.winner is HedgeWinner.ORIGINAL and step - h.step <= window
    )
    return late >= limit


async def _move(chain: Chain, k: int, step: int, x: torch.Tensor, positions: torch.Tensor) -> int:
    """Move hop ``k`` to other servers before ``step`` (opened, its history replayed, then
    ``step`` run through them) and splice them in; returns how many hops stand in its
    place, or 0 when no other server could take it (the hop stays)."""
    slow = chain.hop(k).hop.server.peer_id
    try:
        new = await chain.replace(k, step, {slow})
    except HopFailure as failure:
        chain.policy.ban(failure)
        return 0
    except SwarmError as exc:
        log.info("%s keeps its place: no other server takes it (%s)", slow, exc)
        return 0
    try:
        await chain.run_through(new, step, x, positions)
    except (HopFailure, SessionError) as exc:
        if isinstance(exc, HopFailure):
            chain.policy.ban(exc)
        await _close_all(new)
        return 0
    except BaseException:
        await _close_all(new)
        raise
    log.info("moving %s: raced and late %d times", slow, chain.config.hedging.move_after)
    await chain.splice(k, new, step)
    return len(new)


class _Race:
    """One hedged hop step: the late hop against its replacement; the first full answer
    wins (`_win`) and cancels the other."""

    def __init__(
        self,
        chain: Chain,
        k: int,
        step: int,
        x: torch.Tensor,
        positions: torch.Tensor,
        keep: int | None,
    ) -> None:
        self.chain, self.k, self.step = chain, k, step
        self.x, self.positions, self.keep = x, positions, keep
        self.state = chain.hop(k)
        self.call = StepCall(self.state, chain.config, step, x, positions, keep)
        self.started = self.call.started
        self.scope = trio.CancelScope()
        self.hedged = False
        self.winner = HedgeWinner.NONE
        self.answer: StepAnswer | None = None
        self.new: list[HopState] = []
        self.won_at: float | None = None
        self.failure: HopFailure | None = None  # the late hop failed outright
        self.refused: SessionError | None = None  # our input refused: no one will take it

    async def run(self, deadline: float, send_now: bool) -> None:
        """Race until one answer is kept, both gave up, or ``step_timeout`` passed.

        Most steps answer before the deadline: they are waited for in this task (a nursery
        and a task per hop and step cost a fast chain's client ~0.1 ms of CPU each); only a
        late one goes on in a nursery beside its replacement."""
        config = self.chain.config
        grace = min(config.pipeline.push_grace, deadline)  # late at the deadline: push or not, send
        try:
            answer = await self.call.answer(send_now, grace, within=deadline)
        except HopFailure as failure:
            self.failure = failure  # before the deadline: no replacement is running
            return
        except SessionError as exc:
            self.refused = exc
            return
        if answer is not None:
            self._win(HedgeWinner.ORIGINAL, answer, [])
            return
        with trio.move_on_at(self.started + config.step_timeout), self.scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._original, send_now, grace)
                self.hedged = True
                log.info(
                    "%s has not answered step %d in %.2f s: starting a replacement",
                    self.state.hop.server.peer_id,
                    self.step,
                    deadline,
                )
                nursery.start_soon(self._replacement)

    def _win(self, winner: HedgeWinner, answer: StepAnswer, new: list[HopState]) -> bool:
        if self.winner is not HedgeWinner.NONE:
            return False
        self.winner, self.answer, self.new = winner, answer, new
        self.won_at = trio.current_time() - self.started
        if self.hedged:  # the other side runs: stop it (a step answered in time has none)
            self.scope.cancel()
        return True

    async def _original(self, send_now: bool, grace: float) -> None:
        """The late hop's answer, waited for on (its input went out by the deadline)."""
        try:
            answer = await self.call.answer(send_now, grace)
        except HopFailure as failure:
            self.failure = failure  # a replacement already running may still answer
            return
        except SessionError as exc:
            self.refused = exc
            self.scope.cancel()
            return
        assert answer is not None  # no ``within``: an answer or an error
        self._win(HedgeWinner.ORIGINAL, answer, [])

    async def _replacement(self) -> None:
        slow = self.state.hop.server.peer_id
        try:
            new = await self.chain.replace(self.k, self.step, {slow})
        except HopFailure as failure:  # a replacement server failed the replay
            self.chain.policy.ban(failure)
            return
        except SwarmError as exc:  # no replacement to be had: the late hop may still answer
            log.info("no replacement for %s: %s", slow, exc)
            return
        try:
            out = await self.chain.run_through(new, self.step, self.x, self.positions)
            answer = StepAnswer(out, new[-1].history.receipts[-1], new[-1].history.seconds[-1])
        except (HopFailure, SessionError) as exc:
            if isinstance(exc, HopFailure):
                self.chain.policy.ban(exc)
            await _close_all(new)
            return
        except BaseException:
            await _close_all(new)
            raise
        if not self._win(HedgeWinner.REPLACEMENT, answer, new):
            await _close_all(new)

    def record(self, deadline: float) -> HedgeRecord:
        hop = self.state.hop
        return HedgeRecord(
            self.step, hop.layers, hop.server.peer_id, deadline, self.won_at, self.winner
        )

    async def settle(self) -> int:
        """Keep the winner's answer (splicing a replacement in). Returns and raises what
        `step_hop` does."""
        if self.refused is not None:
            raise self.refused
        if self.winner is HedgeWinner.ORIGINAL:
            assert self.answer is not None
            self.state.history.record(self.x, self.positions, self.answer)
            if self.hedged:  # late enough to be raced: a hedge was spent on it
                self.chain.policy.slow(self.state.hop.server.peer_id)
            return 1
        if self.winner is HedgeWinner.REPLACEMENT:
            if self.failure is not None:
                self.chain.policy.ban(self.failure)
            else:
                self.chain.policy.slow(self.state.hop.server.peer_id)
            await self.chain.splice(self.k, self.new, self.step)
            return len(self.new)
        if self.failure is not None:
            raise self.failure
        timeout = self.chain.config.step_timeout
        raise HopFailure(self.state.hop, DeadlineExceeded(f"no answer within {timeout} s"))


async def _close_all(states: Sequence[HopState]) -> None:
    with trio.CancelScope(shield=True):
        for state in states:
            await close_hop(state)
