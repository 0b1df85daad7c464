"""`PeerWatch`: servers that this server pings itself, and which of them it found gone.

A server that dies without notice leaves its DHT records behind until they expire (up to a
TTL), and until then every reader still counts it. A rebalancer that waited for the records
to expire would see the gap a TTL late; this watch lets it see the gap as soon as it fails
to reach the dead server itself:

- **Whom.** Every ``interval`` seconds it pings (one ``info`` call) the servers the balance
  counts (online or joining, where they serve or announced a move to) at the block just
  *before* its range and at the block just *after* it, up to `PER_BLOCK` of each: those
  whose last ping answered first (records that never answer cannot crowd out the ones that
  do), then those not pinged yet, then the gone ones, longest gone first (so every
  announced server is pinged in turn). Both sides, because then every server whose death
  alone opens a gap is watched by a neighbour. Say ``[a, c)`` is the only server of some
  block. If ``c`` is inside the model, block ``c`` has a server that starts inside
  ``(a, c]`` (one that started at or before ``a`` would serve that block too), and that
  server pings the block before its start, which lies in ``[a, c)``. If ``c`` is the
  model's end and ``a > 0``, block ``a - 1`` has a server that stops inside ``[a, c)``,
  which pings the block after its range. Pinging only the block after a range (as the
  announcer does for route costs) would leave every server that starts at block 0
  unwatched; pinging one's own first block would leave ``0:2`` unwatched beside ``2:4``.

  Neighbours see a gap first, but they are often the servers that cannot fill it (the
  only servers of their own blocks), while the servers free to move (on blocks others
  serve too) are elsewhere. So every server also pings all the servers of every *thin*
  block, one that at most `THIN` servers serve in its view: the blocks where a death or
  two opens a gap. In a healthy swarm few blocks are thin and this costs little; after a
  mass departure many servers see each gap, and the re-check, intent and settle
  (`swarm.server.rebalancer`) let one of them take it. A round pings `MAX_TARGETS` servers
  at most, neighbours first, then the thin blocks' least recently pinged.
- **What a failure means.** A server that did not answer *our own* ping is *gone* in our
  own balance view (`present`) until it answers one again, or until its records are no
  longer read (they expired). Nothing another peer says is taken: a record cannot make us
  count an honest live server gone, so a crowd of identities cannot steer where honest
  servers move. What a wrong verdict (we cannot reach a live peer: a partition, a peer that
  drops pings) costs is at most a wasted move: a gone peer is only *left out* of our view,
  so it never counts as the other server of a block we would leave
  (`swarm.server.balance.decide` moves only off blocks other online servers cover), and a
  move still goes through the rebalancer's re-check and announced intent.
- **News.** When the peers found gone in a round were all the balance counted at some block
  in the announcements last read (a gap, not merely less throughput), `news` goes up and
  the rebalancer (`swarm.server.rebalancer`) runs an early check, still after a random
  delay. Each round raises `news` at most once, so failed pings cannot make a server check
  more than once a round.

The ``ping`` callable is the transport: ``True`` when the server answered in time. The
server passes `info_ping` (one ``info`` call over its connection pool); the internet
simulation passes a modelled one (its servers serve no RPC).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import trio

from swarm.directory import ServerView, ping_server
from swarm.errors import SwarmError
from swarm.net.pool import ConnectionPool
from swarm.server.balance import block_throughputs
from swarm.types import LayerRange, PeerId, ServerState

__all__ = ["PER_BLOCK", "PeerWatch", "WatchStatistics", "info_ping"]

log = logging.getLogger(__name__)

PER_BLOCK = 5  # servers pinged per neighbouring block (as many as the announcer's next-hop pings)
THIN = 2  # a block with at most this many servers (not gone) is thin: all of them are watched
MAX_TARGETS = 24  # servers pinged per round at most (neighbours first)


def info_ping(pool: ConnectionPool, timeout: float) -> Callable[[ServerView], Awaitable[bool]]:
    """A ``ping`` for `PeerWatch`: `ping_server` (dial the server through ``pool`` as the
    `PeerId` its record names, one ``info`` call), all within ``timeout`` seconds."""

    async def ping(server: ServerView) -> bool:
        with trio.move_on_after(timeout):
            try:
                await ping_server(pool, server, timeout)
            except SwarmError:
                return False
            return True
        return False

    return ping


@dataclass(frozen=True)
class WatchStatistics:
    rounds: int  # ping rounds done
    pings: int
    failures: int  # pings that failed
    gone: int  # peers counted gone now
    news: int  # rounds whose failures opened a gap in what was last read


class PeerWatch:
    """Pings the servers of the blocks next to this server's range; knows which are gone.

    ``saw`` gives it the announcements the rebalancer read (it does no DHT reads of its
    own); ``run`` pings every ``interval`` seconds until cancelled."""

    def __init__(
        self,
        me: PeerId,
        num_layers: int,
        ping: Callable[[ServerView], Awaitable[bool]],
        *,
        per_block: int = PER_BLOCK,
    ) -> None:
        self.me = me
        self.num_layers = num_layers
        self._ping = ping
        self.per_block = per_block
        self._views: list[ServerView] = []
        self._answered: set[PeerId] = set()  # peers whose latest ping from us answered
        self._gone: dict[PeerId, int] = {}  # peer -> the round that last found it gone
        self._pinged: dict[PeerId, int] = {}  # peer -> the round that last pinged it
        self._round = 0
        self._pings = 0
        self._failures = 0
        self._news = 0
        self._changed = trio.Event()

    def statistics(self) -> WatchStatistics:
        return WatchStatistics(
            self._round, self._pings, self._failures, len(self._gone), self._news
        )

    @property
    def news(self) -> int:
        """How many rounds so far found a gap (see the module doc); compare to wait."""
        return self._news

    @property
    def answered(self) -> frozenset[PeerId]:
        """The peers whose latest ping from us answered (and that are still announced)."""
        return frozenset(self._answered)

    @property
    def gone(self) -> frozenset[PeerId]:
        """The peers whose latest ping from us failed (and that are still announced)."""
        return frozenset(self._gone)

    def saw(self, views: Sequence[ServerView]) -> None:
        """The announcements just read: whom to watch from now on. What is known of peers
        no longer announced is dropped (memory stays bounded by what the DHT holds)."""
        self._views = list(views)
        announced = {view.peer_id for view in views}
        self._answered &= announced
        self._pinged = {p: at for p, at in self._pinged.items() if p in announced}
        for peer in [p for p in self._gone if p not in announced]:
            del self._gone[peer]

    def present(self, views: Sequence[ServerView]) -> list[ServerView]:
        """``views`` without the peers we found gone."""
        return [view for view in views if view.peer_id not in self._gone]

    def _serving(self, block: int) -> list[ServerView]:
        """The other servers the balance counts at ``block``: online or joining ones that
        serve it or announced a move to it (a dead server's intent counts until it expires)."""
        return [
            view
            for view in self._views
            if view.state != ServerState.DRAINING
            and view.peer_id != self.me
            and (block in view.layers or (view.moving_to is not None and block in view.moving_to))
        ]

    def _uncovered(self, views: Sequence[ServerView]) -> set[int]:
        """Blocks the balance counts nobody at (`swarm.server.balance.block_throughputs`)."""
        per_block = block_throughputs(views, self.num_layers)
        return {block for block, throughput in enumerate(per_block) if throughput <= 0}

    def targets(self, layers: LayerRange) -> list[ServerView]:
        """The servers to ping for a server of ``layers``, each once, `MAX_TARGETS` at most:
        up to ``per_block`` of the servers counted at block ``layers.start - 1`` and at block
        ``layers.stop`` (those inside the model; ones that answered first, then ones not
        pinged yet, then gone ones, longest gone first), then the servers of every thin
        block (`THIN`), least recently pinged first."""
        out: dict[PeerId, ServerView] = {}
        for block in (layers.start - 1, layers.stop):
            if not 0 <= block < self.num_layers:
                continue
            servers = self._serving(block)
            servers.sort(
                key=lambda view: (
                    view.peer_id not in self._answered,
                    self._gone.get(view.peer_id, -1),
                )
            )  # stable
            for view in servers[: self.per_block]:
                out.setdefault(view.peer_id, view)
        thin: dict[PeerId, ServerView] = {}
        for block in range(self.num_layers):
            servers = self._serving(block)
            alive = sum(1 for view in servers if view.peer_id not in self._gone)
            if alive + (block in layers) <= THIN:
                for view in servers:
                    thin.setdefault(view.peer_id, view)
        rest = sorted(
            (view for peer, view in thin.items() if peer not in out),
            key=lambda view: self._pinged.get(view.peer_id, -1),
        )  # stable
        for view in rest[: max(0, MAX_TARGETS - len(out))]:
            out[view.peer_id] = view
        return list(out.values())

    async def ping_round(self, layers: LayerRange) -> None:
        """Ping `targets` concurrently, record who answered, and raise `news` when the ones
        that did not were all the balance counted at some block in the last views."""
        self._round += 1
        targets = self.targets(layers)
        before = self._uncovered(self.present(self._views))

        async def one(view: ServerView) -> None:
            self._pings += 1
            self._pinged[view.peer_id] = self._round
            if await self._ping(view):
                self._answered.add(view.peer_id)
                self._gone.pop(view.peer_id, None)
            else:
                self._failures += 1
                self._answered.discard(view.peer_id)
                if view.peer_id not in self._gone:
                    log.info("watch: %s (%s) did not answer", view.peer_id, view.layers)
                self._gone[view.peer_id] = self._round

        async with trio.open_nursery() as nursery:
            for view in targets:
                nursery.start_soon(one, view)
        opened = self._uncovered(self.present(self._views)) - before
        if opened:
            log.info("watch: blocks %s lost their last server we know of", sorted(opened))
            self._news += 1
            self._changed.set()
            self._changed = trio.Event()

    async def wait_news(self, seen: int) -> int:
        """Return once `news` is past ``seen`` (at once if it already is); returns it."""
        while self._news <= seen:
            await self._changed.wait()
        return self._news

    async def run(
        self,
        interval: float,
        current: Callable[[], LayerRange],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """A `ping_round` for the range served now (``current``) every ``interval``
        seconds, until cancelled."""
        task_status.started()
        while True:
            await trio.sleep(interval)
            await self.ping_round(current())
