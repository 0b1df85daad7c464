"""`RangeMover`: how a serving peer moves to another layer range without a gap.

A move (decided by `swarm.server.rebalancer`) goes:

1. (`intend`, called by the rebalancer before it confirms) announce ``moving_to`` on the
   old range, still ``online``: other servers count us at the new range, clients keep
   routing to the old one;
2. load the new range while the old one still serves, when free memory holds both;
3. announce the old range ``draining`` (clients stop opening sessions here), let its
   sessions finish for up to ``drain_timeout``, then hand the rest back to their clients
   with ``unavailable`` (they re-route and replay without banning us);
4. where memory did not hold both, drop the old weights now and load the new range;
5. switch the handlers to the new span, announce it ``joining`` under the new block keys
   with ``last_move`` (who moved, from, to, why), measure next-hop pings, announce
   ``online``. The old keys keep our ``draining`` record until it expires; readers of
   all keys see the newer record, readers of an old key see us draining.

A failed load before the drain leaves the server where it was (``online``; the rebalancer
withdraws ``moving_to``); a failed load after the old weights were dropped stops the server.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import trio

from swarm.errors import ErrorCode, RemoteError, SwarmError
from swarm.net.messages import RangeMove
from swarm.server.announcer import Announcer
from swarm.server.balance import Decision
from swarm.server.compute import ComputeQueue
from swarm.server.handlers import ServingHandlers
from swarm.server.sessions import SessionTable
from swarm.shards import Span
from swarm.types import LayerRange, ServerState

__all__ = ["RangeMover"]

log = logging.getLogger(__name__)


class RangeMover:
    """Moves the server that owns ``handlers`` (and their state, sessions and queue)."""

    def __init__(
        self,
        handlers: ServingHandlers,
        sessions: SessionTable,
        queue: ComputeQueue,
        announcer: Announcer,
        *,
        load: Callable[[LayerRange], Awaitable[Span]],
        holds_both: Callable[[LayerRange], bool],
        drop: Callable[[Span], None],
        drain_timeout: float,
        on_failure: Callable[[], None],
    ) -> None:
        self.handlers = handlers
        self.sessions = sessions
        self.queue = queue
        self.announcer = announcer
        self._load = load
        self._holds_both = holds_both
        self._drop = drop
        self.drain_timeout = drain_timeout
        self._on_failure = on_failure
        self.moves = 0

    async def intend(self, target: LayerRange | None) -> None:
        """Announce (or, with None, withdraw) the intent to move to ``target``."""
        self.handlers.state.moving_to = target
        with trio.CancelScope(shield=target is None), trio.move_on_after(30):
            await self.announcer.announce()

    async def move(self, decision: Decision) -> None:
        """Serve ``decision.target`` instead of the current range (see the module doc).
        Raises `SwarmError` (e.g. a `ShardError`) when the new range cannot be loaded while
        the old one still serves; the server then stays where it was."""
        reason = decision.reason
        if reason is None:
            raise ValueError(f"not a move: {decision.describe()}")
        state, old = self.handlers.state, self.handlers.span
        target = decision.target
        state.moving_to = target
        new = await self._load(target) if self._holds_both(target) else None
        await self._drain()
        if new is None:
            self._drop(old)
            try:
                new = await self._load(target)
            except SwarmError:
                log.exception("loading %s after dropping %s failed; stopping", target, old.layers)
                self._on_failure()
                raise
        self.handlers.span = new
        if new is not old:
            self._drop(old)
        state.moving_to = None
        state.last_move = RangeMove(
            from_range=old.layers,
            to_range=target,
            reason=reason,
            at=time.time(),
            gain=min(decision.gain, 1e9),
        )
        state.state = ServerState.JOINING
        self.announcer.move_to(target)
        await self.announcer.announce()
        await self.announcer.measure_next_pings()
        state.state = ServerState.ONLINE
        await self.announcer.announce()
        self.moves += 1
        log.warning("moved %s", decision.describe())

    async def _drain(self) -> None:
        """Announce draining; wait for the old range's sessions and queued work (at most
        ``drain_timeout``); hand what is left back with ``unavailable``."""
        self.handlers.state.state = ServerState.DRAINING
        await self.announcer.announce()
        with trio.move_on_after(self.drain_timeout):
            while len(self.sessions) or self.queue.statistics().queued > 0 or self.queue.running:
                await trio.sleep(0.01)
        going = RemoteError(ErrorCode.UNAVAILABLE, "the server is moving to other layers")
        if self.sessions.close_all(going):
            with trio.move_on_after(1.0):
                await trio.sleep(0.05)  # the handlers send their clients the reason
        with trio.move_on_after(self.drain_timeout):
            while self.queue.statistics().queued > 0 or self.queue.running:
                await trio.sleep(0.01)
