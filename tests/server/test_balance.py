"""Rebalancing decisions (`swarm.server.balance`) and the loop around them
(`swarm.server.rebalancer`), with announcements as plain lists and trio's virtual clock."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence

import pytest
import trio
import trio.testing

from swarm.directory import ServerView
from swarm.errors import ConfigError
from swarm.identity import Identity
from swarm.net.messages import RelayHop
from swarm.server.balance import (
    PROBE_SLACK,
    RELAYED_SHARE,
    BalanceConfig,
    Decision,
    Stay,
    block_throughputs,
    choose_start,
    decide,
    delivered_throughput,
    yielding,
)
from swarm.server.liveness import PeerWatch
from swarm.server.rebalancer import SETTLE_MARGIN, Rebalancer
from swarm.types import LayerRange, MoveReason, PeerId, Reachability, ServerState

L = LayerRange


def peer(name: str) -> PeerId:
    return Identity.from_seed(name.encode()).peer_id


def view(
    name: str,
    layers: LayerRange,
    throughput: float = 1.0,
    state: ServerState = ServerState.ONLINE,
    moving_to: LayerRange | None = None,
) -> ServerView:
    return ServerView(
        peer(name), "127.0.0.1:1", layers, throughput, 1000, state=state, moving_to=moving_to
    )


def test_per_block_throughput_counts_moving_servers_where_they_go_and_skips_draining() -> None:
    views = [
        view("a", L(0, 2), 2.0),
        view("b", L(0, 2), 1.0, moving_to=L(2, 4)),
        view("c", L(2, 4), 5.0, state=ServerState.DRAINING),
        view("d", L(1, 3), 1.0, state=ServerState.JOINING),
    ]
    assert block_throughputs(views, 4) == [2.0, 3.0, 2.0, 1.0]
    assert block_throughputs(views, 4, without=peer("a")) == [0.0, 1.0, 2.0, 1.0]


def test_choose_start_takes_the_window_whose_sorted_throughputs_are_least() -> None:
    assert choose_start([3, 3, 0, 0], 2) == 2
    assert choose_start([1, 0, 1, 5], 2) == 0  # (0, 1) ties with (0, 1): the earliest
    assert choose_start([2, 2, 2, 2], 2) == 0


def test_all_on_the_first_half_one_moves_to_the_uncovered_half() -> None:
    views = [view(n, L(0, 2)) for n in "abcd"]
    d = decide(views, peer("a"), L(0, 2), 1.0, 4)
    assert d.move and d.reason is MoveReason.UNCOVERED and d.target == L(2, 4)
    assert (d.before.uncovered, d.after.uncovered) == (2, 0)
    # the first mover announced moving_to: the next one moves for the bottleneck (1 -> 2)
    views[0] = view("a", L(0, 2), moving_to=L(2, 4))
    d = decide(views, peer("b"), L(0, 2), 1.0, 4)
    assert d.move and d.reason is MoveReason.BOTTLENECK and d.target == L(2, 4)
    assert d.gain == pytest.approx(2.0)
    # two on each half: balanced
    views[1] = view("b", L(2, 4))
    for name in "abcd":
        current = L(2, 4) if name in "ab" else L(0, 2)
        assert not decide(views, peer(name), current, 1.0, 4).move


def test_the_margin_decides_small_gains() -> None:
    # bottleneck 2 (blocks 2:4) -> 3 if "a" (throughput 1) moves there: 2 < 0.75 * 3
    views = [view("a", L(0, 2), 1), view("b", L(0, 2), 10), view("c", L(2, 4), 1)]
    views.append(view("d", L(2, 4), 1))
    assert decide(views, peer("a"), L(0, 2), 1.0, 4).reason is MoveReason.BOTTLENECK
    strict = decide(views, peer("a"), L(0, 2), 1.0, 4, quality=0.5)
    assert not strict.move and strict.stay is Stay.BALANCED


def test_never_leaves_a_block_only_it_serves() -> None:
    # "a" alone on 0:2, nobody on 2:4: moving would trade one gap for another
    d = decide([view("a", L(0, 2))], peer("a"), L(0, 2), 1.0, 4)
    assert not d.move
    # "a" alone on block 0 (b serves block 1), 2:4 empty: moving there would cover two
    # blocks but leave block 0 uncovered
    d = decide([view("a", L(0, 2)), view("b", L(1, 2))], peer("a"), L(0, 2), 1.0, 4)
    assert d.target == L(2, 4) and not d.move and d.stay is Stay.SOLE_SERVER
    # a joining server on block 0 does not make leaving it safe (it may never come online)
    joining = view("c", L(0, 2), state=ServerState.JOINING)
    d = decide([view("a", L(0, 2)), view("b", L(1, 2)), joining], peer("a"), L(0, 2), 1.0, 4)
    assert d.reason is None and d.stay is Stay.SOLE_SERVER
    # an online one does
    online = view("c", L(0, 2))
    d = decide([view("a", L(0, 2)), view("b", L(1, 2)), online], peer("a"), L(0, 2), 1.0, 4)
    assert d.move and d.reason is MoveReason.UNCOVERED


def test_a_balanced_swarm_of_unequal_servers_stays() -> None:
    rng = random.Random(5)
    views = [view(f"s{i}", L(2 * (i % 4), 2 * (i % 4) + 2), 1.0 + rng.random()) for i in range(12)]
    moves = [v.peer_id for v in views if decide(views, v.peer_id, v.layers, v.throughput, 8).move]
    # rebalancing converges: apply moves one at a time until nobody wants to move
    for _round in range(20):
        mover = next(
            (v for v in views if decide(views, v.peer_id, v.layers, v.throughput, 8).move), None
        )
        if mover is None:
            break
        d = decide(views, mover.peer_id, mover.layers, mover.throughput, 8)
        views = [
            ServerView(v.peer_id, v.address, d.target, v.throughput, 1000)
            if v.peer_id == mover.peer_id
            else v
            for v in views
        ]
    else:
        pytest.fail(f"no fixed point after 20 moves (first movers {moves})")
    assert all(not decide(views, v.peer_id, v.layers, v.throughput, 8).move for v in views)


def test_config_is_checked() -> None:
    with pytest.raises(ConfigError):
        BalanceConfig(period=0)
    with pytest.raises(ConfigError):
        BalanceConfig(quality=1.5)
    assert BalanceConfig().rebalances(pinned=False)
    assert not BalanceConfig().rebalances(pinned=True)
    assert BalanceConfig(enabled=True).rebalances(pinned=True)
    assert BalanceConfig(period=10).cooldown_seconds == 20


class Directory:
    """Announcements every fake server reads and writes at once (the DHT, instantly)."""

    def __init__(
        self, views: Sequence[ServerView], latency: Callable[[], float] = lambda: 0.05
    ) -> None:
        self.views = {v.peer_id: v for v in views}
        self.latency = latency  # seconds a read or an announcement takes
        self.reads = 0
        self.layers = 4
        self.moves: list[tuple[float, str, LayerRange, LayerRange]] = []
        self.names = {v.peer_id: f"s{i}" for i, v in enumerate(views)}
        self.unreachable: set[PeerId] = set()  # their pings fail (their records stay)

    def watch(self, me: PeerId) -> PeerWatch:
        async def ping(server: ServerView) -> bool:
            await trio.sleep(0.05)
            return server.peer_id not in self.unreachable

        return PeerWatch(me, 4, ping)

    def rebalancer(
        self,
        me: PeerId,
        config: BalanceConfig,
        seed: int,
        load: float = 5.0,
        watch: PeerWatch | None = None,
    ) -> Rebalancer:
        async def read() -> list[ServerView]:
            self.reads += 1
            seen = list(self.views.values())  # what the DHT held when asked
            await trio.sleep(self.latency())  # a lookup takes a while
            return seen

        async def intend(target: LayerRange | None) -> None:
            v = self.views[me]
            await trio.sleep(self.latency())  # the moving_to announcement lands a while later
            self.views[me] = ServerView(
                me, v.address, v.layers, v.throughput, 1000, moving_to=target
            )

        async def move(decision: Decision) -> None:
            v = self.views[me]
            await trio.sleep(load)  # loading the new range, draining the old
            self.views[me] = ServerView(me, v.address, decision.target, v.throughput, 1000)
            self.moves.append((trio.current_time(), self.names[me], v.layers, decision.target))

        return Rebalancer(
            config, me, self.layers, read=read, current=lambda: self.views[me].layers,
            throughput=lambda: self.views[me].throughput, intend=intend, move=move,
            rng=random.Random(seed), watch=watch,
        )  # fmt: skip

    def coverage(self, without: Sequence[PeerId] = ()) -> list[int]:
        counts = [0] * 4
        for v in self.views.values():
            if v.peer_id not in without:
                for block in v.layers:
                    counts[block] += 1
        return counts


async def run_swarm(directory: Directory, config: BalanceConfig, seconds: float) -> None:
    async with trio.open_nursery() as nursery:
        for i, me in enumerate(directory.views):
            await nursery.start(directory.rebalancer(me, config, seed=i).run)
        with trio.move_on_after(seconds):
            while True:  # a block is never left uncovered while it had a server
                await trio.sleep(0.1)
                assert all(c > 0 for c in directory.coverage()[:2])
        nursery.cancel_scope.cancel()


async def test_four_servers_on_one_half_spread_without_herding(
    autojump_clock: trio.testing.MockClock,
) -> None:
    directory = Directory([view(n, L(0, 2)) for n in "abcd"])
    config = BalanceConfig(enabled=True, period=10.0)
    await run_swarm(directory, config, seconds=60)
    assert directory.coverage() == [2, 2, 2, 2]
    assert len(directory.moves) == 2  # nobody moved twice, nobody moved back
    await run_swarm(directory, config, seconds=500)  # a balanced swarm stays put
    assert len(directory.moves) == 2


@pytest.mark.parametrize("recheck", [0.5, 0.0])
async def test_two_servers_seeing_the_same_gap_do_not_both_move(
    autojump_clock: trio.testing.MockClock, recheck: float
) -> None:
    # a, b and c serve 0:2, nobody serves 2:4; a and b check at the same moment. One move
    # fills the gap and leaves the swarm balanced ([2, 2, 1, 1]: a second mover would make
    # it [1, 1, 2, 2]), so a second move would be a herd's.
    directory = Directory([view("a", L(0, 2)), view("b", L(0, 2)), view("c", L(0, 2))])
    # recheck 0: both re-check at once and announce their intents together; the settle
    # wait and the PeerId order still let only one go
    config = BalanceConfig(enabled=True, period=10.0, recheck=recheck, settle=1.0)
    a, b = (directory.rebalancer(peer(n), config, seed=s) for n, s in (("a", 1), ("b", 2)))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.step)
        nursery.start_soon(b.step)
    assert len(directory.moves) == 1
    assert all(v.moving_to is None for v in directory.views.values())  # the loser withdrew
    assert directory.coverage() == [2, 2, 1, 1]


async def test_cooldown_holds_a_second_move(autojump_clock: trio.testing.MockClock) -> None:
    directory = Directory([view("a", L(0, 2)), view("b", L(0, 2))])
    config = BalanceConfig(enabled=True, period=10.0, cooldown=100.0, recheck=0.0)
    a = directory.rebalancer(peer("a"), config, seed=1, load=0.0)
    moved = await a.step()
    assert moved is not None and moved.move
    # two more servers join a on 2:4: going back to 0:2 would double the bottleneck, but a
    # moved a moment ago
    directory.views[peer("c")] = view("c", L(2, 4), 1.0)
    directory.views[peer("d")] = view("d", L(2, 4), 1.0)
    held = await a.step()
    assert held is not None and held.stay is Stay.COOLDOWN
    assert a.statistics().moves == 1
    # b dies and 0:2 has nobody: covering a gap is not held (it cannot flap: a move never
    # uncovers a block, so each such move leaves fewer blocks uncovered)
    del directory.views[peer("b")]
    moved = await a.step()
    assert moved is not None and moved.reason is MoveReason.UNCOVERED
    assert a.statistics().moves == 2


async def test_checks_come_at_randomised_periods(autojump_clock: trio.testing.MockClock) -> None:
    a = Directory([view("a", L(0, 2)), view("b", L(2, 4))]).rebalancer(
        peer("a"), BalanceConfig(enabled=True, period=10.0), seed=3
    )
    waits = [a.next_wait() for _ in range(200)]
    assert 5.0 <= min(waits) and max(waits) <= 15.0
    assert len({round(w, 3) for w in waits}) > 150


def relayed_view(name: str, layers: LayerRange, throughput: float = 1.0) -> ServerView:
    hop = RelayHop(peer("relay-" + name), "127.0.0.1", 2)
    return dataclasses.replace(
        view(name, layers, throughput), relays=(hop,), reachability=Reachability.UNREACHABLE
    )


def test_a_gap_covered_only_by_a_relayed_server_attracts_a_direct_one() -> None:
    # announced: 2 + 2 on 0:2, 2 (relayed) on 2:4: balanced if relayed counted in full
    views = [view("a", L(0, 2), 2), view("b", L(0, 2), 2), relayed_view("c", L(2, 4), 2)]
    assert delivered_throughput(views[2]) == pytest.approx(2 * RELAYED_SHARE)
    d = decide(views, peer("b"), L(0, 2), 2.0, 4)
    # counted at 0.2: bottleneck 0.4 (2:4) -> 2.0 (0:2 keeps "a"): 0.4 < 0.75 * 2.0
    assert d.move and d.reason is MoveReason.BOTTLENECK and d.target == L(2, 4)
    assert d.before.throughput == pytest.approx(0.4) and d.after.throughput == pytest.approx(2)
    # at a share of 1 the relay costs nothing, and nobody moves
    assert not decide(views, peer("b"), L(0, 2), 2.0, 4, relayed_share=1.0).move
    # the margin still decides: a direct server whose gain is too small stays
    small = [view("a", L(0, 2), 2), view("b", L(0, 2), 0.2), relayed_view("c", L(2, 4), 5)]
    # 2:4 counts 1.0; "b" moving there: 1.2 on 2:4, 2 on 0:2 -> 1.0 < 0.75 * 1.2 is false
    d = decide(small, peer("b"), L(0, 2), 0.2, 4)
    assert d.target == L(2, 4) and not d.move and d.stay is Stay.BALANCED


def test_a_relayed_server_counts_itself_at_its_share() -> None:
    # "c" is relayed: its own 2 tokens/s count 0.4 wherever it goes, so moving it from
    # 0:2 (which "a" also covers) to the gap covers it, but the bottleneck is then 0.4
    views = [view("a", L(0, 2), 2), relayed_view("c", L(0, 2), 2)]
    d = decide(views, peer("c"), L(0, 2), 2.0, 4)
    assert d.move and d.reason is MoveReason.UNCOVERED
    assert d.after.throughput == pytest.approx(0.4)
    per_block = block_throughputs(views, 4)
    assert per_block == pytest.approx([2.4, 2.4, 0, 0])
    with pytest.raises(ConfigError):
        BalanceConfig(relayed_share=0)


def measured_by(name: str, layers: LayerRange, figures: dict[str, float]) -> ServerView:
    """A server of ``layers`` that announces what servers ``figures`` names delivered when
    it probed them (tokens/s)."""
    measured = {peer(other): tps for other, tps in figures.items()}
    return dataclasses.replace(view(name, layers, 1.0), next_delivered=measured)


def test_a_slow_server_counts_with_what_its_peers_measured_it_delivering() -> None:
    # "slow" announces 10 tokens/s on 2:4; the servers before it measured 1 and 1.5: it
    # counts for PROBE_SLACK x the lower median
    probes = [measured_by("p", L(0, 2), {"slow": 1.0}), measured_by("q", L(0, 2), {"slow": 1.5})]
    slow = view("slow", L(2, 4), 10.0)
    assert PROBE_SLACK == 2.0
    assert block_throughputs([*probes, slow], 4) == pytest.approx([2, 2, 2, 2])
    assert delivered_throughput(slow, measured=1.0) == 2.0
    # an honest server measured at half its announcement (a probe's fixed costs) counts fully
    assert delivered_throughput(slow, measured=5.0) == 10.0
    # claiming more than it delivers gains nothing, and a peer that measured it faster than
    # it announced does not raise it either
    assert block_throughputs([*probes, view("slow", L(2, 4), 1e6)], 4)[2] == pytest.approx(2)
    fast = [measured_by("p", L(0, 2), {"slow": 50.0}), slow]
    assert block_throughputs(fast, 4)[2] == pytest.approx(10)
    # its own figures about itself count for nothing
    selfish = dataclasses.replace(slow, next_delivered={peer("slow"): 10.0})
    assert block_throughputs([probes[0], selfish], 4)[2] == pytest.approx(2)


def test_a_gap_served_by_an_overstating_server_attracts_a_fast_one() -> None:
    # 0:2 has "a" and "b" (10 each); 2:4 only "slow", which announces 10 but was measured
    # delivering 0.5 by "a" (counts 1): counted as announced, the swarm looks balanced
    a = measured_by("a", L(0, 2), {"slow": 0.5})
    a = dataclasses.replace(a, throughput=10.0)
    views = [a, view("b", L(0, 2), 10.0), view("slow", L(2, 4), 10.0)]
    d = decide(views, peer("b"), L(0, 2), 10.0, 4)
    assert d.move and d.target == L(2, 4) and d.reason is MoveReason.BOTTLENECK
    assert d.before.throughput == pytest.approx(1.0) and d.after.throughput == pytest.approx(10)
    unmeasured = [dataclasses.replace(a, next_delivered={}), *views[1:]]
    assert not decide(unmeasured, peer("b"), L(0, 2), 10.0, 4).move
    # a server measured slow counts itself slow too: "slow" gains nothing by moving
    assert decide(views, peer("slow"), L(2, 4), 10.0, 4).before.throughput == pytest.approx(1)


def test_a_measured_relayed_server_counts_what_it_delivered_not_the_share() -> None:
    probe = measured_by("p", L(0, 2), {"c": 0.75})
    relayed = relayed_view("c", L(2, 4), 2.0)
    assert block_throughputs([probe, relayed], 4)[2] == pytest.approx(1.5)
    assert block_throughputs([relayed], 4)[2] == pytest.approx(2 * RELAYED_SHARE)  # unmeasured


def test_the_watch_pings_the_blocks_on_either_side_so_block_0_is_watched_too() -> None:
    # 0:2 | 2:4 | 4:6 on a 6-block model, three servers each (no block is thin): the servers
    # of 2:4 ping block 1 (0:2's) and block 4; those of 4:6 block 3; those of 0:2 block 2
    names = [f"{r}{i}" for r in range(3) for i in range(3)]
    views = [view(n, L(2 * int(n[0]), 2 * int(n[0]) + 2)) for n in names]
    views.append(view("d", L(3, 5), state=ServerState.DRAINING))  # not online: not pinged
    range_of = {peer(n): n[0] for n in names}

    async def never(server: ServerView) -> bool:
        raise AssertionError

    def targets(name: str, layers: LayerRange) -> set[str]:
        watch = PeerWatch(peer(name), 6, never)
        watch.saw(views)
        return {range_of[v.peer_id] for v in watch.targets(layers)}

    assert targets("10", L(2, 4)) == {"0", "2"}
    assert targets("20", L(4, 6)) == {"1"}
    assert targets("00", L(0, 2)) == {"1"}
    # a thin block (at most THIN online servers) is watched by everyone
    del views[7:9]  # 4:6 keeps one server
    assert targets("00", L(0, 2)) == {"1", "2"}


def test_the_watch_pings_at_most_per_block_and_those_that_answered_first() -> None:
    views = [view(f"s{i}", L(0, 2)) for i in range(8)]

    async def never(server: ServerView) -> bool:
        raise AssertionError

    watch = PeerWatch(peer("me"), 4, never, per_block=3)
    watch.saw(views)
    assert len(watch.targets(L(2, 4))) == 3
    watch._answered.add(peer("s7"))  # (as a round that reached it would)
    assert watch.targets(L(2, 4))[0].peer_id == peer("s7")


@pytest.mark.parametrize("watch", [0.25, 0.0])
async def test_a_dead_servers_gap_is_filled_before_its_records_expire(
    autojump_clock: trio.testing.MockClock, watch: float
) -> None:
    # d served 0:2 alone and died; its record is still read (it expires later than this
    # test looks). a and b, on 2:4, ping block 1: d does not answer, and one of them moves
    # to 0:2 within about a period; without the watch, nobody sees the gap
    directory = Directory([view("d", L(0, 2)), view("a", L(2, 4)), view("b", L(2, 4))])
    directory.unreachable.add(peer("d"))
    config = BalanceConfig(enabled=True, period=10.0, settle=1.0, watch=watch)
    async with trio.open_nursery() as nursery:
        for name, seed in (("a", 1), ("b", 2)):
            me = peer(name)
            rebalancer = directory.rebalancer(me, config, seed, watch=directory.watch(me))
            await nursery.start(rebalancer.run)
        with trio.move_on_after(15.0):  # 1.5 periods
            while True:
                await trio.sleep(0.1)
                assert directory.coverage(without=[peer("d")])[2:] != [0, 0]
        nursery.cancel_scope.cancel()
    if watch:
        assert [(m[2], m[3]) for m in directory.moves] == [(L(2, 4), L(0, 2))]
        assert directory.coverage(without=[peer("d")]) == [1, 1, 1, 1]
    else:
        assert directory.moves == []


async def test_a_peer_we_cannot_reach_costs_a_move_but_never_coverage(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # d is alive (its blocks are covered) but drops our pings: a or b moves to 0:2, a wasted
    # move, but 2:4 keeps its other server, and nobody moves twice
    directory = Directory([view("d", L(0, 2)), view("a", L(2, 4)), view("b", L(2, 4))])
    directory.unreachable.add(peer("d"))
    config = BalanceConfig(enabled=True, period=10.0, settle=1.0)
    async with trio.open_nursery() as nursery:
        for name, seed in (("a", 3), ("b", 4)):
            me = peer(name)
            rebalancer = directory.rebalancer(me, config, seed, watch=directory.watch(me))
            await nursery.start(rebalancer.run)
        with trio.move_on_after(200.0):
            while True:
                await trio.sleep(0.1)
                assert all(directory.coverage())  # d still serves 0:2 for real
        nursery.cancel_scope.cancel()
    assert len(directory.moves) == 1


async def test_many_identities_that_drop_pings_cannot_make_servers_herd(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # eight identities announce 0:2 and answer no ping; a, b and c serve 2:4. The gap at 0:2
    # is real (nobody honest serves it): one honest server fills it, the others stay
    sybils = [view(f"s{i}", L(0, 2), 100.0) for i in range(8)]
    honest = [view(n, L(2, 4)) for n in "abc"]
    directory = Directory([*sybils, *honest])
    directory.unreachable.update(v.peer_id for v in sybils)
    config = BalanceConfig(enabled=True, period=10.0, settle=1.0)
    async with trio.open_nursery() as nursery:
        for seed, v in enumerate(honest):
            watch = directory.watch(v.peer_id)
            rebalancer = directory.rebalancer(v.peer_id, config, seed, watch=watch)
            await nursery.start(rebalancer.run)
        await trio.sleep(100.0)
        nursery.cancel_scope.cancel()
    assert len(directory.moves) == 1
    assert directory.coverage(without=[v.peer_id for v in sybils]) == [1, 1, 3 - 1, 3 - 1]


def test_a_block_left_to_one_other_server_needs_that_server_to_answer_our_ping() -> None:
    views = [view("a", L(0, 2)), view("b", L(0, 2))]  # 2:4 has nobody
    unproven = decide(views, peer("a"), L(0, 2), 1.0, 4, answered=frozenset())
    assert unproven.stay is Stay.SOLE_SERVER
    proven = decide(views, peer("a"), L(0, 2), 1.0, 4, answered={peer("b")})
    assert proven.move and proven.target == L(2, 4)
    # two other servers: no ping needed (both records would have to outlive their servers)
    views.append(view("c", L(0, 2)))
    assert decide(views, peer("a"), L(0, 2), 1.0, 4, answered=frozenset()).move


def test_decide_with_a_target_says_whether_moving_there_pays() -> None:
    # 2:3 and 3:4 have nobody: the best window for a is 2:3 (the earliest of equals), but
    # moving to 3:4 pays as well (one block fewer uncovered); 1:2 (c's) would not
    views = [view("a", L(0, 1)), view("b", L(0, 1)), view("c", L(1, 2))]
    assert decide(views, peer("a"), L(0, 1), 1.0, 4).target == L(2, 3)
    there = decide(views, peer("a"), L(0, 1), 1.0, 4, target=L(3, 4))
    assert there.move and there.target == L(3, 4) and there.reason is MoveReason.UNCOVERED
    assert not decide(views, peer("a"), L(0, 1), 1.0, 4, target=L(1, 2)).move
    # the rule against leaving a block uncovered holds for a given target too
    views = [view("a", L(0, 2)), view("b", L(0, 1))]  # 2:4 would gain two, lose block 1
    assert decide(views, peer("a"), L(0, 2), 1.0, 4, target=L(2, 4)).stay is Stay.SOLE_SERVER
    with pytest.raises(ValueError):
        decide(views, peer("a"), L(0, 2), 1.0, 4, target=L(3, 4))


async def test_a_confirmation_that_ranks_the_windows_differently_still_moves(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # a announces a move to 3:4 (nobody serves it); its confirming read misses d's record
    # (lookups miss records now and then), so 2:3 looks uncovered too and ranks first. The
    # announced move still fills a gap, so a goes on instead of withdrawing and starting over
    directory = Directory(
        [view("a", L(0, 1)), view("b", L(0, 1)), view("c", L(1, 2)), view("d", L(2, 3))]
    )
    a = directory.rebalancer(peer("a"), BalanceConfig(enabled=True, period=10.0), seed=1)
    intend = a._intend

    async def intend_then_miss_d(target: LayerRange | None) -> None:
        await intend(target)
        if target is not None:
            del directory.views[peer("d")]

    a._intend = intend_then_miss_d
    moved = await a.step()
    assert moved is not None and moved.move and moved.target == L(3, 4)
    assert [(m[2], m[3]) for m in directory.moves] == [(L(0, 1), L(3, 4))]


@pytest.mark.parametrize("early", [True, False])
async def test_an_early_check_that_finds_a_gap_skips_the_recheck(
    autojump_clock: trio.testing.MockClock, early: bool
) -> None:
    # an early check waited a random jitter before its read, so that read is the fresh one:
    # it goes straight to the intent, then the confirming read (two reads, not three)
    directory = Directory([view("a", L(0, 2)), view("b", L(0, 2)), view("c", L(0, 2))])
    a = directory.rebalancer(peer("a"), BalanceConfig(enabled=True, period=10.0), seed=1)
    moved = await a.step(early=early)
    assert moved is not None and moved.reason is MoveReason.UNCOVERED
    assert directory.reads == (2 if early else 3)
    # a bottleneck move found early still gets its re-check (it is no emergency)
    directory = Directory([view("a", L(0, 2), 4.0), view("b", L(0, 2), 4.0), view("c", L(2, 4))])
    a = directory.rebalancer(peer("a"), BalanceConfig(enabled=True, period=10.0), seed=1)
    moved = await a.step(early=early)
    assert moved is not None and moved.reason is MoveReason.BOTTLENECK
    assert directory.reads == 3


@pytest.mark.parametrize("latency", [0.05, 2.0])
async def test_the_settle_is_sized_by_the_measured_read_and_intent(
    autojump_clock: trio.testing.MockClock, latency: float
) -> None:
    # the settle lasts SETTLE_MARGIN x (the deciding read's start -> the intent announced),
    # at most BalanceConfig.settle: short where the DHT answers fast, the cap where it is slow
    directory = Directory([view("a", L(0, 2)), view("b", L(0, 2))], latency=lambda: latency)
    config = BalanceConfig(enabled=True, period=10.0, recheck=0.0, settle=3.0)
    a = directory.rebalancer(peer("a"), config, seed=1)
    await a.step()
    settle = a.statistics().settle
    assert settle == pytest.approx(min(3.0, SETTLE_MARGIN * 2 * latency))


async def test_two_simultaneous_movers_resolve_to_one_with_the_measured_settle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # a, b and c serve 0:2, nobody 2:4; a and b check at the same moment, with no re-check
    # wait to spread them, and every read and announcement takes 0.5-1 s (drawn per call):
    # the intents land at different times, in either order. With the settle sized from
    # what each measured, one of them moves every time; with no settle at all the pair
    # herds in some draws (so the draws do test the settle)
    herds = 0
    for seed in range(20):
        for settle in (10.0, 0.0):
            rng = random.Random(seed)
            directory = Directory(
                [view("a", L(0, 2)), view("b", L(0, 2)), view("c", L(0, 2))],
                latency=lambda: rng.uniform(0.5, 1.0),  # noqa: B023 (used within the loop)
            )
            config = BalanceConfig(enabled=True, period=10.0, recheck=0.0, settle=settle)
            a, b = (directory.rebalancer(peer(n), config, seed=seed) for n in "ab")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(a.step)
                nursery.start_soon(b.step)
            if settle:
                assert len(directory.moves) == 1, seed
                assert directory.coverage() == [2, 2, 1, 1]
                assert a.statistics().settle or b.statistics().settle
            else:
                herds += len(directory.moves) > 1
    assert herds > 0


async def test_a_gap_taken_by_a_server_that_sorts_first_leaves_only_the_best_move(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # 8 blocks: b (on 6:8) sees 3:5 half uncovered and announces a move there; meanwhile a,
    # whose PeerId sorts first, announces a move to 3:5 too. b's confirming read counts a
    # there: 3:5 would still raise the bottleneck (4 -> 6 tokens/s), but it was announced
    # to fill a gap, and the best window is 2:4 now, so b withdraws instead of following a
    # (the next check moves it where it is best)
    assert peer("a").digest < peer("b").digest
    throughputs = [("0:2", 1), ("0:2", 8), ("6:8", 4), ("1:3", 8), ("5:7", 1), ("1:3", 4)]
    throughputs += [("4:6", 8), ("6:8", 2)]
    others = [view(f"o{i}", L.parse(r), t) for i, (r, t) in enumerate(throughputs)]
    directory = Directory([*others, view("a", L(5, 7), 4.0), view("b", L(6, 8), 8.0)])
    directory.layers = 8
    b = directory.rebalancer(peer("b"), BalanceConfig(enabled=True, period=10.0), seed=1)
    intend = b._intend

    async def intend_as_a_does(target: LayerRange | None) -> None:
        await intend(target)
        if target is not None:
            directory.views[peer("a")] = view("a", L(5, 7), 4.0, moving_to=target)

    b._intend = intend_as_a_does
    done = await b.step()
    assert done is not None and done.target == L(2, 4) and done.reason is MoveReason.BOTTLENECK
    assert directory.moves == [] and directory.views[peer("b")].moving_to is None
    assert decide(
        yielding(list(directory.views.values()), peer("b")), peer("b"), L(6, 8), 8.0, 8,
        target=L(3, 5),
    ).reason is MoveReason.BOTTLENECK  # fmt: skip
