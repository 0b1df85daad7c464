"""Rebalancing: where this server's blocks help the swarm most (pure logic, no I/O).

Every token crosses every block, so a swarm is as fast as its least served block. The
swarm's throughput through block ``i`` is the sum of the announced throughputs of the
servers that serve it (online and joining ones; a server that announces ``moving_to`` is
counted where it is going; draining ones not at all). The *bottleneck* of a swarm is then
how many blocks nobody serves and, after that, the least throughput of a block.

`decide` holds every other server where it is, takes this server out, puts it back at the
best window of the same length (Petals' rule: the window whose throughputs, sorted, are
least), and says to move when that makes the bottleneck clearly better: fewer uncovered
blocks, or a least block throughput that rises so that ``before < quality × after``
(``quality`` 0.75 as in Petals' ``balance_quality``). It never moves a server off a block
that no other online, staying server covers, whatever the gain; with the rebalancer's
watch (`swarm.server.liveness`), a block left to one other server only if that server
answered our latest ping (a dead server's record outlives it).

Servers count with the throughput they deliver, not only what they announce
(`delivered_throughput`): a server announces what its own compute measured, but the servers
of the block before its range probe it (a timed one-token ``forward`` through its span,
`swarm.server.announcer`) and announce what it delivered (`PingEntry.tps`); it then counts
for `PROBE_SLACK` times the lower median of those figures
(`swarm.directory.delivered_by_peers`) where that is less than its announcement, never
more, so a slow server, or one that overstates, counts for what others got from it, and
claiming more than it delivers gains it nothing. The servers of block 0 have no server
before them and count their announcement. A server nobody measured counts its
announcement, except one that can be dialed only through a relay (it announces relays, or
announces itself unreachable): every byte of its activations crosses the relay twice,
spliced between channels that other circuits share, and until a peer measured it, it
counts at a stated share of its announcement (Petals' 0.2;
``BalanceConfig.relayed_share``). A gap that only slow or relayed servers cover thus
still attracts a fast direct server when the gain clears ``quality``.

The trio loop around it (randomised periods, cooldown, re-check) is
`swarm.server.rebalancer`.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from swarm.directory import PROBE_SLACK, ServerView, counted_throughput, delivered_by_peers
from swarm.errors import ConfigError
from swarm.types import LayerRange, MoveReason, PeerId, Reachability, ServerState

__all__ = [
    "PROBE_SLACK",
    "RELAYED_SHARE",
    "BalanceConfig",
    "Bottleneck",
    "Decision",
    "Stay",
    "block_throughputs",
    "bottleneck",
    "choose_start",
    "decide",
    "delivered_throughput",
    "relayed",
    "yielding",
]

RELAYED_SHARE = 0.2  # of its announced throughput, a relayed server counts (Petals: 0.2)


@dataclass(frozen=True)
class BalanceConfig:
    """When and how a server rebalances.

    - ``enabled`` (None): whether to check at all. None: only a server whose range was
      chosen for it (``--layers auto``) moves; a range the operator pinned stays unless
      ``enabled`` is True (``--rebalance``); False (``--no-rebalance``) never moves.
    - ``period`` (120 s): mean seconds between checks; each wait is drawn uniformly from
      ``[0.5, 1.5] × period``, so servers that started together do not check together.
    - ``quality`` (0.75): move when the bottleneck throughput now is below ``quality`` × the
      bottleneck after the move (Petals' ``balance_quality``); lower asks for a larger gain.
    - ``cooldown`` (None: 2 × ``period``): no second move within this many seconds of a move,
      unless it covers a block nobody serves (`MoveReason.UNCOVERED`).
    - ``recheck`` (0.2): after deciding to move, wait a random ``[0, recheck] × period`` and
      decide again from fresh announcements (another server may have taken the gap).
    - ``settle`` (5 s): after announcing the intent to move (``moving_to``), wait for other
      servers' intents to land in the DHT, then confirm (see `yielding`): at most this
      long, and `swarm.server.rebalancer.SETTLE_MARGIN` times the seconds this server took
      from the read it decided on to its intent announced (another server's intent takes
      about as long to land; a swarm whose DHT is fast settles in less).
    - ``drain_timeout`` (30 s): how long a move lets the old range's sessions finish before
      handing them back to their clients (``unavailable``: they move on without a ban).
    - ``relayed_share`` (0.2): the share of its announced throughput that a server reachable
      only through a relay counts for (see `delivered_throughput`).
    - ``watch`` (0.25): ping the servers of the blocks on either side of this server's range
      every ``watch × period`` seconds; one that fails our ping counts as gone, and a gap
      it leaves starts an early check (`swarm.server.liveness`). 0: no watch (a dead
      server's gap is seen when its records expire).
    """

    enabled: bool | None = None
    period: float = 120.0
    quality: float = 0.75
    cooldown: float | None = None
    recheck: float = 0.2
    settle: float = 5.0
    drain_timeout: float = 30.0
    relayed_share: float = RELAYED_SHARE
    watch: float = 0.25

    def __post_init__(self) -> None:
        if not self.period > 0:
            raise ConfigError(f"balance period must be positive, got {self.period}")
        if not 0 < self.quality <= 1:
            raise ConfigError(f"balance quality must be in (0, 1], got {self.quality}")
        if self.cooldown is not None and self.cooldown < 0:
            raise ConfigError(f"balance cooldown must be >= 0, got {self.cooldown}")
        if not 0 <= self.recheck <= 1:
            raise ConfigError(f"balance recheck must be in [0, 1], got {self.recheck}")
        if self.settle < 0:
            raise ConfigError(f"balance settle must be >= 0, got {self.settle}")
        if self.drain_timeout < 0:
            raise ConfigError(f"drain_timeout must be >= 0, got {self.drain_timeout}")
        if not 0 < self.relayed_share <= 1:
            raise ConfigError(f"relayed share must be in (0, 1], got {self.relayed_share}")
        if not 0 <= self.watch <= 1:
            raise ConfigError(f"balance watch must be in [0, 1], got {self.watch}")

    def rebalances(self, *, pinned: bool) -> bool:
        """Whether a server whose range was given (``pinned``) or chosen rebalances."""
        return self.enabled if self.enabled is not None else not pinned

    @property
    def cooldown_seconds(self) -> float:
        return 2 * self.period if self.cooldown is None else self.cooldown


@dataclass(frozen=True, order=True)
class Bottleneck:
    """How bad a swarm's weakest point is: blocks nobody serves, then the least block
    throughput (negated, so that a smaller `Bottleneck` is a better swarm)."""

    uncovered: int
    neg_throughput: float

    @property
    def throughput(self) -> float:
        return -self.neg_throughput


class Stay(enum.Enum):
    """Why `decide` keeps a server where it is."""

    BALANCED = "balanced"  # no range is clearly better for the swarm
    SOLE_SERVER = "sole_server"  # the better range would leave a block nobody else serves
    WHOLE_MODEL = "whole_model"  # it serves every block; there is nowhere to go
    COOLDOWN = "cooldown"  # it moved too recently (decided by the rebalancer)


@dataclass(frozen=True)
class Decision:
    """What `decide` concluded: ``target`` is the best range; ``move`` says whether to go
    there, with ``reason`` (a `MoveReason`) or else ``stay`` (a `Stay`)."""

    current: LayerRange
    target: LayerRange
    before: Bottleneck
    after: Bottleneck
    reason: MoveReason | None = None
    stay: Stay | None = None

    @property
    def move(self) -> bool:
        return self.reason is not None

    @property
    def gain(self) -> float:
        """Bottleneck throughput after / before (0 when before was 0)."""
        before = self.before.throughput
        return self.after.throughput / before if before > 0 else 0.0

    def describe(self) -> str:
        """One line for logs and status: ``0:2 -> 2:4 (uncovered: 2 -> 0 blocks uncovered)``."""
        head = f"{self.current} -> {self.target}"
        b, a = self.before, self.after
        detail = (
            f"{b.uncovered} -> {a.uncovered} blocks uncovered"
            if b.uncovered != a.uncovered
            else f"bottleneck {b.throughput:.3g} -> {a.throughput:.3g} tokens/s"
        )
        why = self.reason.value if self.reason is not None else (self.stay or Stay.BALANCED).value
        return f"{head} ({why}: {detail})"


def _counted_range(view: ServerView) -> LayerRange | None:
    if view.state == ServerState.DRAINING:
        return None
    return view.moving_to if view.moving_to is not None else view.layers


def relayed(view: ServerView) -> bool:
    """Whether clients reach the server of ``view`` only through a relay: it announces
    relays, or it announced itself unreachable (then a relay is all that could reach it)."""
    return bool(view.relays) or view.reachability == Reachability.UNREACHABLE


def delivered_throughput(
    view: ServerView, relayed_share: float = RELAYED_SHARE, measured: float | None = None
) -> float:
    """The throughput ``view``'s server counts for in the swarm's balance: the least of its
    announced one and `PROBE_SLACK` times what peers ``measured`` it delivering
    (`delivered_by_peers`; never more than it announced); unmeasured, its announced one,
    times ``relayed_share`` when it is `relayed` (a stated factor, as Petals' 0.2)."""
    if measured is not None:
        return counted_throughput(view, measured)
    return view.throughput * (relayed_share if relayed(view) else 1.0)


def block_throughputs(
    views: Iterable[ServerView],
    num_layers: int,
    *,
    without: PeerId | None = None,
    relayed_share: float = RELAYED_SHARE,
) -> list[float]:
    """Per block: the sum of the `delivered_throughput`s of the servers that serve it
    (online and joining; a moving server at its ``moving_to``; draining ones and
    ``without`` left out), with what peers measured them delivering from ``views``' own
    next-hop figures (`delivered_by_peers`)."""
    views = list(views)
    measured = delivered_by_peers(views)
    per_block = [0.0] * num_layers
    for view in views:
        layers = _counted_range(view)
        if view.peer_id == without or layers is None:
            continue
        throughput = delivered_throughput(view, relayed_share, measured.get(view.peer_id))
        for block in range(layers.start, min(layers.stop, num_layers)):
            per_block[block] += throughput
    return per_block


def bottleneck(per_block: Sequence[float]) -> Bottleneck:
    """The `Bottleneck` of a swarm with these per-block throughputs."""
    uncovered = sum(1 for t in per_block if t <= 0)
    return Bottleneck(uncovered, -min(per_block, default=0.0))


def choose_start(per_block: Sequence[float], num_blocks: int) -> int:
    """The start of the window of ``num_blocks`` blocks that most needs a server: the one
    whose throughputs, sorted ascending, are lexicographically least (ties: the earliest)."""
    starts = range(len(per_block) - num_blocks + 1)
    return min(starts, key=lambda s: (sorted(per_block[s : s + num_blocks]), s))


def _with(per_block: Sequence[float], layers: LayerRange, throughput: float) -> list[float]:
    out = list(per_block)
    for block in layers:
        out[block] += throughput
    return out


def _sole_blocks(
    views: Iterable[ServerView],
    me: PeerId,
    leaving: Iterable[int],
    answered: Collection[PeerId] | None = None,
) -> list[int]:
    """Blocks in ``leaving`` that no other *online, staying* server serves (a joining one
    may never come online; a moving one is about to leave). With ``answered`` (the peers
    whose latest ping from us answered), a block that exactly one such server serves counts
    as served only if that server is among them: its record may outlive it."""
    servers: dict[int, list[PeerId]] = {}
    for view in views:
        if view.peer_id == me or view.state != ServerState.ONLINE or view.moving_to is not None:
            continue
        for block in view.layers:
            servers.setdefault(block, []).append(view.peer_id)

    def served(block: int) -> bool:
        others = servers.get(block, [])
        if answered is None or len(others) != 1:
            return bool(others)
        return others[0] in answered

    return [block for block in leaving if not served(block)]


def yielding(views: Iterable[ServerView], me: PeerId) -> list[ServerView]:
    """The announcements as ``me`` reads them when confirming its own announced move:
    another server's intent (``moving_to``) counts only if its `PeerId` sorts before ours.
    Two servers that announced moves at once both see both intents; the one that sorts
    first goes on (it counts the other as staying), the other one counts the first where
    it goes and backs off, so they never both leave a block or both fill one gap."""
    return [
        dataclasses.replace(v, moving_to=None)
        if v.moving_to is not None and v.peer_id != me and v.peer_id.digest > me.digest
        else v
        for v in views
    ]


def decide(
    views: Sequence[ServerView],
    me: PeerId,
    current: LayerRange,
    throughput: float,
    num_layers: int,
    *,
    quality: float = 0.75,
    relayed_share: float = RELAYED_SHARE,
    answered: Collection[PeerId] | None = None,
    target: LayerRange | None = None,
) -> Decision:
    """Whether this server (``me``, serving ``current`` at ``throughput`` tokens/s) should
    move, and where, given the other servers' announcements ``views`` (our own, if among
    them, counts only for whether we are `relayed`: we count ourselves at ``current``).
    Every server, ourselves included, counts with what it delivers
    (`delivered_throughput`: what peers measured, else a relayed one at
    ``relayed_share`` of its throughput). With ``answered`` (the peers whose latest ping
    from us answered: `swarm.server.liveness.PeerWatch.answered`), a block this server
    would leave to a single other server is left only if that server answered.

    With ``target`` (a range as long as ``current``, inside the model), whether moving
    *there* pays, by the same rules, instead of choosing the best window: the rebalancer
    confirms a move it announced this way, so that a fresh read that ranks the windows
    differently (lookups miss records now and then) does not undo a move that still
    fills a gap or clears the margin. Raises `ValueError` for a ``target`` of another
    length or outside the model."""
    others = block_throughputs(views, num_layers, without=me, relayed_share=relayed_share)
    own = next((view for view in views if view.peer_id == me), None)
    if own is not None:
        mine = dataclasses.replace(own, throughput=throughput)
        throughput = delivered_throughput(mine, relayed_share, delivered_by_peers(views).get(me))
    before = bottleneck(_with(others, current, throughput))
    if len(current) >= num_layers:
        return Decision(current, current, before, before, stay=Stay.WHOLE_MODEL)
    if target is None:
        start = choose_start(others, len(current))
        target = LayerRange(start, start + len(current))
    elif len(target) != len(current) or target.stop > num_layers:
        raise ValueError(f"cannot move {current} to {target} in a {num_layers}-block model")
    after = bottleneck(_with(others, target, throughput))
    if target == current:
        return Decision(current, target, before, after, stay=Stay.BALANCED)
    reason: MoveReason | None = None
    if after.uncovered < before.uncovered:
        reason = MoveReason.UNCOVERED
    elif after.uncovered == before.uncovered and before.throughput < quality * after.throughput:
        reason = MoveReason.BOTTLENECK
    if reason is None:
        return Decision(current, target, before, after, stay=Stay.BALANCED)
    leaving = [block for block in current if block not in target]
    if _sole_blocks(views, me, leaving, answered):
        return Decision(current, target, before, after, stay=Stay.SOLE_SERVER)
    return Decision(current, target, before, after, reason=reason)
