"""`Rebalancer`: the trio loop that checks, now and then, whether this server should move.

Each wait is drawn from ``[0.5, 1.5] × BalanceConfig.period`` (servers started together
drift apart). A check reads every server's announcement (the ``read`` callable: the DHT in
production, a list in tests) and asks `swarm.server.balance.decide`. A move goes in three
steps, so that two servers that saw the same gap do not both take it, and two servers of
one block do not both leave it:

1. re-check: wait a random ``[0, recheck] × period`` and decide again from fresh
   announcements (a server that moved first is counted where it went); the move goes on
   to the range this decision picks, which may differ from the first one's. An early
   check (below) that finds a block nobody serves skips this step: it read after a random
   wait of its own, so its read is already the fresh one;
2. intent: announce ``moving_to`` (``intend``), wait for intents announced at the same
   time to land (the settle), and decide again reading them with
   `swarm.server.balance.yielding` (of two servers that both intend to move, the one whose
   `PeerId` sorts first goes on, the other backs off), asking whether the announced move
   still pays for the reason it was announced (``decide(target=...)``), not whether it is
   still the best one: a fresh read that ranks the windows differently does not undo a
   move that still fills its gap (a move that pays now only for another reason goes on
   only if it is still the best one);
3. move (``move``: the server loads the new range, drains the old one, switches), or
   withdraw the intent (``intend(None)``).

The settle is sized from what this server measured: `SETTLE_MARGIN` × the seconds from
the start of the read it decided on to its intent announced, at most
``BalanceConfig.settle``. Why that is enough: of two servers A (whose `PeerId` sorts
first) and B that intend the same move, A ignores B's intent and goes on, so B must see
A's. If A's deciding read missed B's intent (it began before B's intent landed), A's
intent lands at most A's read-to-intent time later, and B reads only its own
read-to-intent time × `SETTLE_MARGIN` after its intent landed: B sees A's intent unless
A's DHT calls took more than twice as long as B's, or longer than the cap allows. (A
fixed settle shorter than the DHT's read and announce times leaves the same window.)

No move within ``cooldown`` of the last one, except a move that covers a block nobody
serves (`MoveReason.UNCOVERED`): those cannot flap (a move never uncovers a block, so each
leaves fewer blocks uncovered in the mover's view), and a server that moved a moment ago
may be the one that sees a gap first.

With a `swarm.server.liveness.PeerWatch` (``watch``), the loop also pings the servers of
the blocks on either side of this server's range every ``BalanceConfig.watch × period``
seconds; a check counts the peers that failed our own pings as gone (whatever their
records still say), and a ping round that finds a block's last servers gone starts an
early check, after a random ``[0, EARLY_JITTER] × period`` (then the intent and settle
above; the re-check too unless the early check found a block nobody serves). So a gap
left by servers that died is seen within a watch interval instead of when their records
expire.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import trio

from swarm.directory import ServerView
from swarm.errors import SwarmError
from swarm.server.balance import BalanceConfig, Decision, Stay, decide, yielding
from swarm.server.liveness import PeerWatch
from swarm.types import LayerRange, MoveReason, PeerId

__all__ = ["EARLY_JITTER", "SETTLE_MARGIN", "Rebalancer", "RebalancerStatistics"]

log = logging.getLogger(__name__)

EARLY_JITTER = 0.1  # an early check waits a random [0, this] x period first
SETTLE_MARGIN = 2.0  # the settle: this x (the deciding read's start -> our intent announced)


@dataclass(frozen=True)
class RebalancerStatistics:
    checks: int
    moves: int
    last: Decision | None  # the latest check's decision (None before the first)
    early_checks: int = 0  # checks started by the watch's news (a gap seen early)
    settle: float | None = None  # the latest settle's seconds (None before the first intent)


class Rebalancer:
    """Checks at randomised periods and calls ``move(decision)`` when a move pays.

    ``read`` returns the announcements of every server of the model; ``current`` and
    ``throughput`` say what this server serves now and how fast. ``move`` returns once the
    server serves ``decision.target``; an exception it raises (a `SwarmError`) is logged
    and the server stays where it was.
    """

    def __init__(
        self,
        config: BalanceConfig,
        me: PeerId,
        num_layers: int,
        *,
        read: Callable[[], Awaitable[Sequence[ServerView]]],
        current: Callable[[], LayerRange],
        throughput: Callable[[], float],
        intend: Callable[[LayerRange | None], Awaitable[None]],
        move: Callable[[Decision], Awaitable[None]],
        rng: random.Random | None = None,
        watch: PeerWatch | None = None,
    ) -> None:
        self.config = config
        self.me = me
        self.num_layers = num_layers
        self._read = read
        self._current = current
        self._throughput = throughput
        self._intend = intend
        self._move = move
        self._rng = rng or random.Random()
        self._checks = 0
        self._moves = 0
        self._last: Decision | None = None
        self._last_move_at: float | None = None
        self.watch = watch
        self._early = 0
        self._news_seen = 0
        self._settle: float | None = None

    def statistics(self) -> RebalancerStatistics:
        return RebalancerStatistics(
            self._checks, self._moves, self._last, self._early, self._settle
        )

    def next_wait(self) -> float:
        """Seconds until the next check: uniform in ``[0.5, 1.5] × period``."""
        return self.config.period * self._rng.uniform(0.5, 1.5)

    async def check(
        self,
        *,
        confirming: bool = False,
        target: LayerRange | None = None,
        reason: MoveReason | None = None,
    ) -> Decision | None:
        """Read the announcements and decide (None when they could not be read);
        ``confirming``: our own intent is announced, read others' with `yielding`;
        ``target``: whether moving there still pays for ``reason`` (`decide`'s
        ``target``); where it pays for another reason, or not at all, the best move."""
        started = trio.current_time()
        try:
            views = await self._read()
        except SwarmError as exc:
            log.info("rebalancing: reading announcements failed: %s", exc)
            return None
        if self.watch is not None:
            self.watch.saw(views)
            views = self.watch.present(views)  # peers that failed our own pings are gone
        if all(view.peer_id != self.me for view in views):
            # a lookup that timed out returned a part; decide counts us from what we know,
            # and a part can only hide other servers of our blocks (we then stay) or show
            # a gap that the re-check and the confirmation read again
            log.debug("rebalancing: the announcements read miss our own")
        if confirming:
            views = yielding(views, self.me)
        decision = self._decide(views, target)
        if target is not None and decision.reason is not reason:
            # e.g. the gap it meant to fill was taken by a server whose PeerId sorts first,
            # and the move pays now only as a bottleneck move: as at any other check, that
            # goes on only to the best window (so two that saw one gap do not both go)
            decision = self._decide(views, None)
        self._checks += 1
        self._last = decision
        log.debug(
            "rebalancing check (%d servers, read in %.1f s): %s",
            len(views), trio.current_time() - started, decision.describe(),
        )  # fmt: skip
        return decision

    def _decide(self, views: Sequence[ServerView], target: LayerRange | None) -> Decision:
        return decide(
            views, self.me, self._current(), self._throughput(), self.num_layers,
            quality=self.config.quality, relayed_share=self.config.relayed_share,
            answered=self.watch.answered if self.watch is not None else None, target=target,
        )  # fmt: skip

    def _cooling(self) -> bool:
        last = self._last_move_at
        return last is not None and trio.current_time() - last < self.config.cooldown_seconds

    async def step(self, *, early: bool = False) -> Decision | None:
        """One check, and the move when it pays and survives the re-check (skipped for an
        ``early`` check that finds a block nobody serves) and the confirmation. Returns the
        decision acted on (a move) or the last one made (a stay; None: nothing read)."""
        read_at = trio.current_time()
        decision = await self.check()
        if decision is None or not decision.move:
            return decision
        if self._cooling() and decision.reason is not MoveReason.UNCOVERED:
            log.info("rebalancing: would move %s, but moved recently", decision.describe())
            return Decision(
                decision.current, decision.target, decision.before, decision.after,
                stay=Stay.COOLDOWN,
            )  # fmt: skip
        if not (early and decision.reason is MoveReason.UNCOVERED):
            first = decision
            await trio.sleep(self.config.period * self.config.recheck * self._rng.random())
            read_at = trio.current_time()
            decision = await self.check()
            # the re-check may pick another target (fresh reads shift ties between windows,
            # or show a gap that appeared meanwhile); the intent announces the one it picked
            if (
                decision is None
                or not decision.move
                or (self._cooling() and decision.reason is not MoveReason.UNCOVERED)
            ):
                log.info("rebalancing: the re-check no longer moves %s", first.describe())
                return decision
        await self._intend(decision.target)
        settle = min(self.config.settle, SETTLE_MARGIN * (trio.current_time() - read_at))
        self._settle = settle
        log.debug("rebalancing: intent %s announced; settling %.2f s", decision.target, settle)
        await trio.sleep(settle)
        final = await self.check(confirming=True, target=decision.target, reason=decision.reason)
        if final is None or not final.move or final.target != decision.target:
            log.info("rebalancing: withdrawing the move %s", decision.describe())
            await self._intend(None)
            return final
        log.warning("rebalancing: moving %s", final.describe())
        try:
            await self._move(final)
        except SwarmError as exc:
            log.warning("rebalancing: the move %s failed: %s", final.describe(), exc)
            await self._intend(None)
            return final
        self._moves += 1
        self._last_move_at = trio.current_time()
        return final

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Check and move until cancelled (and, with a ``watch``, ping the neighbours)."""
        watch, interval = self.watch, self.config.watch * self.config.period
        if watch is None or interval <= 0:
            task_status.started()
            while True:
                await trio.sleep(self.next_wait())
                await self.step()
        async with trio.open_nursery() as nursery:
            try:
                watch.saw(await self._read())  # whom to watch before the first check
            except SwarmError as exc:
                log.info("rebalancing: reading announcements failed: %s", exc)
            await nursery.start(watch.run, interval, self._current)
            task_status.started()
            while True:
                early = await self._wait_turn(watch)
                decision = await self.step(early=early)
                if early and decision is not None:
                    log.info("rebalancing: early check: %s", decision.describe())

    async def _wait_turn(self, watch: PeerWatch) -> bool:
        """Until the next periodic check, or an early one (returns True) when the watch found
        a gap."""
        early = False
        with trio.move_on_after(self.next_wait()):
            self._news_seen = await watch.wait_news(self._news_seen)
            self._early += 1
            early = True
            log.info("rebalancing: a server we watch did not answer and left a gap; checking early")
            await trio.sleep(self.config.period * EARLY_JITTER * self._rng.random())
        self._news_seen = watch.news  # a check reads everything the news was about
        return early
