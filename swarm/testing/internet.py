"""An internet-sized swarm, simulated in one process: the DHT plane real, the compute plane
modelled (for `benchmarks/internet.py` and a small run in the test suite).

Real: N `DHTNode`s on loopback whose datagrams cross emulated links
(`DatagramLinkEmulator`: 3 regions, a one-way delay per region pair, loss), signed
`ServerAnnouncement`s under the real block keys, the real strict decoder, and the real
rebalancing (`swarm.server.rebalancer.Rebalancer` with `swarm.server.balance.decide`) reading
them. Sybils are DHT nodes that answer nothing (every datagram they send is lost) or, a
share ``junk_sybils`` of them, answer every lookup with junk (`swarm.testing.sybils`:
contacts pointing at nothing or at themselves, malformed contacts, tampered, re-signed and
unsigned records under the real block keys); the report counts forged records that any
lookup or read accepted (none should be).

Modelled: a server is one of the DHT nodes plus a layer range and a throughput; it announces
and rebalances for real, but serves no RPC (a move costs ``load_seconds``). Its rebalancer
watches its neighbours with the product's `swarm.server.liveness.PeerWatch`; only the
``info`` ping itself is modelled (a live server answers after the round trip, a dead one
never: the ping fails after ``ping_timeout``). A client plans a route over what it read from
the DHT (Dijkstra over block boundaries, cost = one-way link delays + blocks / throughput)
and "generates" by sleeping the route's per-token cost, with the product client's failure
policy (`swarm.client.config.FailureConfig`'s defaults and its `BanList`): it waits up to
``client_wait`` for a route before it starts (``swarm generate --wait``); a hop that died
meanwhile is banned and costs a re-plan from a fresh read (a recovery, waiting up to
``route_wait_s`` for a route, at most ``max_recoveries`` of them); one that moved is passed
over for the range it left. Each failed generation is counted under its cause
(`SimReport.failures`). An oracle plans the same way over the live servers as they really
are, for the route-cost ratio.

Churn: departures (abrupt: the node's socket closes, its records stay until they expire) and
arrivals (a new server takes the weakest window, as ``--layers auto`` does) at a rate per
minute, and once a mass departure of a share of the servers (with ``mass_leave_gap``, also
every server of one block), whose healing is timed: from the departure until every block
has an online server again (0 when no block lost its last server).
"""

from __future__ import annotations

import enum
import heapq
import logging
import math
import random
import statistics
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

import trio

from swarm.client.bans import BanList
from swarm.client.config import FailureConfig
from swarm.dht import DHTNode, Record, StorageConfig
from swarm.directory import (
    ServerView,
    block_key,
    block_keys,
    counted_throughput,
    delivered_by_peers,
    servers_from_records,
)
from swarm.errors import SwarmError
from swarm.net.messages import PingEntry, RangeMove, RelayHop, ServerAnnouncement
from swarm.server.announcer import MAX_PINGS
from swarm.server.balance import (
    BalanceConfig,
    Decision,
    block_throughputs,
    choose_start,
    delivered_throughput,
)
from swarm.server.liveness import PeerWatch
from swarm.server.rebalancer import Rebalancer
from swarm.testing.internet_plane import MODEL, REGIONS, DHTSlice, SliceStatistics, region_of
from swarm.testing.internet_workers import Worker, WorkerSpec, open_workers
from swarm.testing.sybils import FORGED_MARK
from swarm.types import LayerRange, PeerId, Reachability, ServerState

__all__ = ["Failure", "ServerKind", "SimConfig", "SimReport", "run_simulation"]

log = logging.getLogger(__name__)


class Failure(enum.StrEnum):
    """Why a simulated generation failed (`SimReport.failures`)."""

    # no route before it started, after ``client_wait``: a block had no live server ...
    START_UNCOVERED = "no route to start: a block had no live server"
    # ... every block had one, but the client's lookups missed live servers' records
    START_MISSED = "no route to start: lookups missed live records"
    START_OTHER = "no route to start: other"  # (e.g. a record not yet updated after a move)
    # the same, for a recovery's re-plan after ``route_wait_s``
    RECOVERY_UNCOVERED = "no route to recover: a block had no live server"
    RECOVERY_MISSED = "no route to recover: lookups missed live records"
    RECOVERY_OTHER = "no route to recover: other"
    GAVE_UP = "more hop failures than max_recoveries"


class ServerKind(enum.StrEnum):
    """How a simulated server delivers what it announces."""

    FAST = "fast"  # delivers what it announces
    SLOW = "slow"  # delivers ``slow_delivers`` of it (overloaded, or it overstates)
    RELAYED = "relayed"  # reachable only through a relay; delivers ``relayed_delivers`` of it


@dataclass(frozen=True)
class SimConfig:
    """One simulated swarm. Times are real seconds (the DHT runs for real)."""

    dht_nodes: int = 60
    servers: int = 12
    blocks: int = 8
    span: int = 2  # blocks per server
    intra: tuple[float, float] = (0.005, 0.015)  # one-way seconds inside a region
    inter: tuple[float, float] = (0.040, 0.120)  # one-way seconds across regions
    loss: float = 0.01
    sybil_share: float = 0.1
    junk_sybils: float = 0.0  # of the sybils, the share that answer junk (the rest: nothing)
    clients: int = 3
    tokens: int = 16  # per generation
    duration: float = 30.0
    period: float = 3.0  # mean balance period
    ttl: float = 8.0  # announcement TTL (re-announced every half)
    churn_per_minute: float = 2.0  # departures and as many arrivals
    mass_leave_at: float = 10.0  # seconds into the run (0: never)
    mass_leave_share: float = 0.3
    mass_leave_gap: bool = False  # also every server of one block leaves (a certain gap)
    load_seconds: float = 0.5  # a move's load and drain
    seed: int = 0
    processes: int = 1  # DHT nodes split over this many processes (`internet_workers`)
    # after ``duration``, run on up to this many seconds while the mass departure's gap is
    # not healed yet (a busy machine slows the DHT; tests give it room, figures do not)
    heal_grace: float = 0.0
    # a client waits this long for a route before it starts a generation, as `swarm
    # generate --wait` does (0: a generation without a route fails at once)
    client_wait: float = 60.0
    slow_share: float = 0.2  # of the servers, slow ones (`ServerKind.SLOW`)
    slow_delivers: float = 0.25
    relayed_share: float = 0.2  # of the servers, relayed ones (`ServerKind.RELAYED`)
    relayed_delivers: float = 0.3
    # servers announce what the servers of the block after their range delivered, as the
    # product's announcer measures it (modelled: the truth, as the best of its probes would
    # be on an idle path); False: nobody measures, everyone counts what it announces
    probes: bool = True
    # servers ping the servers of the blocks beside their range every ``watch`` x period and
    # count those that fail as gone (`swarm.server.liveness`, as the product's servers do;
    # `BalanceConfig.watch`); 0: they see a dead server's gap only when its records expire
    watch: float = 0.25
    # a ping to a dead server fails after this long (the product's default `ping_timeout`:
    # a machine that vanished answers nothing, it does not refuse)
    ping_timeout: float = 2.0
    # every DHT node's `StorageConfig.verified_cache` (0: each signature verified every time)
    verified_cache: int = StorageConfig.verified_cache


@dataclass
class SimReport:
    config: SimConfig
    lookup_seconds: list[float] = field(default_factory=list)
    lookup_recall: list[float] = field(default_factory=list)
    route_ratio: list[float] = field(default_factory=list)  # planned cost / oracle cost
    uncovered: list[tuple[float, int]] = field(default_factory=list)  # (t, blocks uncovered)
    heal_seconds: float | None = None  # after the mass departure (None: never healed)
    generations: int = 0  # finished (succeeded or failed)
    started: int = 0  # started: those not finished when the run ended were still going
    succeeded: int = 0
    recoveries: int = 0
    failures: dict[Failure, int] = field(default_factory=dict)  # failed generations, by cause
    stale_picks: int = 0  # hops planned onto a server already gone or moved (stale record)
    start_waits: list[float] = field(default_factory=list)  # seconds a client waited to start
    recovery_waits: list[float] = field(default_factory=list)  # ... a recovery for a route
    token_seconds: list[float] = field(default_factory=list)
    datagrams_per_node_minute: float = 0.0
    bytes_per_node_minute: float = 0.0
    moves: int = 0
    lost_datagrams: int = 0
    junk_replies: int = 0  # find_node / find_value replies the junk-answering sybils sent
    forged_sent: int = 0  # forged or junk records among them
    signatures_verified: int = 0  # record signatures all honest nodes verified
    signatures_cached: int = 0  # record checks spared by their `VerifiedRecords`
    forged_accepted: int = 0  # records or server views from a forgery that a read accepted
    slices: list[SliceStatistics] = field(default_factory=list)  # per process, this one first
    seconds: float = 0.0  # how long it ran: ``duration``, plus any ``heal_grace`` used
    # per kind of server, as the balance counted them at the last look: servers, announced,
    # delivered and counted tokens/s (sums over live servers), and how many peers measured
    throughput: dict[ServerKind, dict[str, float]] = field(default_factory=dict)

    def summary(self) -> dict[str, object]:
        def pct(values: Sequence[float], q: float) -> float:
            if not values:
                return math.nan
            ordered = sorted(values)
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

        marks = [*self.uncovered, (self.seconds or self.config.duration, 0)]
        uncovered_time = sum((b[0] - a[0]) for a, b in pairwise(marks) if a[1])
        return {
            "lookup_p50_ms": 1e3 * pct(self.lookup_seconds, 0.5),
            "lookup_p99_ms": 1e3 * pct(self.lookup_seconds, 0.99),
            "lookups": len(self.lookup_seconds),
            "recall": statistics.fmean(self.lookup_recall) if self.lookup_recall else math.nan,
            "route_cost_vs_oracle_median": pct(self.route_ratio, 0.5),
            "route_cost_vs_oracle_p90": pct(self.route_ratio, 0.9),
            "seconds_with_a_block_uncovered": uncovered_time,
            "max_blocks_uncovered": max((u for _, u in self.uncovered), default=0),
            "heal_seconds_after_mass_leave": self.heal_seconds,
            "heal_periods_after_mass_leave": (
                None if self.heal_seconds is None else self.heal_seconds / self.config.period
            ),
            "generations": self.generations,
            "success_rate": self.succeeded / self.generations if self.generations else math.nan,
            "generations_unfinished_at_the_end": self.started - self.generations,
            "recoveries": self.recoveries,
            "failures": {str(k): v for k, v in sorted(self.failures.items())},
            "stale_picks": self.stale_picks,
            "generations_that_waited_to_start": sum(1 for w in self.start_waits if w > 0),
            "start_wait_s_p50_max": (pct(self.start_waits, 0.5), max(self.start_waits, default=0)),
            "recoveries_that_waited_for_a_route": sum(1 for w in self.recovery_waits if w > 0),
            "recovery_wait_s_max": max(self.recovery_waits, default=0.0),
            "tokens": len(self.token_seconds),
            "token_ms_p50": 1e3 * pct(self.token_seconds, 0.5),
            "token_ms_p90": 1e3 * pct(self.token_seconds, 0.9),
            "dht_datagrams_per_node_minute": self.datagrams_per_node_minute,
            "dht_bytes_per_node_minute": self.bytes_per_node_minute,
            "datagrams_lost": self.lost_datagrams,
            "moves": self.moves,
            "junk_replies": self.junk_replies,
            "forged_records_sent": self.forged_sent,
            "dht_signatures_verified": self.signatures_verified,
            "dht_signature_checks_spared": self.signatures_cached,
            "forged_records_accepted": self.forged_accepted,
            "processes": len(self.slices),
            "dht_nodes_per_process": [s.honest for s in self.slices],
            "throughput_by_kind": {str(k): v for k, v in self.throughput.items()},
        }


@dataclass
class _Server:
    index: int
    node: DHTNode
    region: str
    throughput: float  # announced
    layers: LayerRange
    kind: ServerKind = ServerKind.FAST
    delivered: float = 0.0  # what it really delivers (tokens/s through its span)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    alive: bool = True
    moving: bool = False
    moving_to: LayerRange | None = None
    last_move: RangeMove | None = None
    port: int = 0
    since: float = 0.0  # when its current range was first announced (trio time)

    @property
    def peer_id(self) -> PeerId:
        return self.node.peer_id

    def view(self) -> ServerView:
        """As it really is (for the oracle): at the throughput it delivers."""
        return ServerView(self.peer_id, f"127.0.0.1:{self.port}", self.layers, self.delivered, 1000)


_THROUGHPUT_COLUMNS = ("servers", "announced", "delivered", "counted", "measured_by_peers")


class _Sim:
    def __init__(self, config: SimConfig) -> None:
        self.cfg = config
        self.rng = random.Random(config.seed)
        self.plane = DHTSlice(
            seed=config.seed, name="", intra=config.intra, inter=config.inter,
            loss=config.loss, ttl=config.ttl, blocks=config.blocks,
            verified_cache=config.verified_cache,
        )  # fmt: skip
        self.links = self.plane.links
        self.delay = self.plane.delay
        self.nodes = self.plane.nodes
        self.liars = self.plane.liars
        self.report = SimReport(config)
        self.region: dict[int, str] = {}
        self.sybils: set[int] = set()
        self.servers: list[_Server] = []
        self.by_peer: dict[PeerId, _Server] = {}
        self.free_nodes: list[int] = []
        self.started = 0.0
        self.failure_config = FailureConfig()  # the product client's defaults

    # ---- the DHT plane ----
    def worker_specs(self) -> list[WorkerSpec]:
        """What each worker process hosts: an equal share of the nodes the coordinator does
        not (see `local_nodes`), and as large a share of the sybils."""
        cfg = self.cfg
        rest = cfg.dht_nodes - self.local_nodes()
        specs = []
        for w in range(1, cfg.processes):
            nodes = rest // (cfg.processes - 1) + (w <= rest % (cfg.processes - 1))
            specs.append(
                WorkerSpec(
                    name=f"w{w}-",
                    nodes=nodes,
                    sybils=int(cfg.sybil_share * nodes),
                    junk=cfg.junk_sybils,
                    bootstrap=self.nodes[0].address,
                    seed=cfg.seed,
                    intra=cfg.intra,
                    inter=cfg.inter,
                    loss=cfg.loss,
                    ttl=cfg.ttl,
                    blocks=cfg.blocks,
                    verified_cache=cfg.verified_cache,
                )
            )
        return specs

    def local_nodes(self) -> int:
        """How many DHT nodes the coordinator hosts: all of them in one process; else half
        a worker's share (it also runs every server, client and probe), but enough for the
        servers, the arrivals churn brings and the clients' nodes."""
        cfg = self.cfg
        if cfg.processes <= 1:
            return cfg.dht_nodes
        needed = math.ceil((cfg.servers * 1.5 + cfg.clients + 2) / (1 - cfg.sybil_share))
        return min(cfg.dht_nodes, max(cfg.dht_nodes // (2 * cfg.processes - 1), needed))

    async def open_nodes(self) -> None:
        """Open this process's nodes (workers' join through the first; see `run_simulation`)."""
        await self.plane.open(1)

    async def open_rest(self) -> None:
        cfg = self.cfg
        local = self.local_nodes()
        await self.plane.open(local - 1)
        for i, node in enumerate(self.nodes):
            self.region[i] = region_of(("127.0.0.1", node.port))
        log.info("%d DHT nodes up in this process", local)
        self.plane.joined()
        candidates = list(range(1, local))
        self.rng.shuffle(candidates)
        n_sybils = int(cfg.sybil_share * local)
        await self.plane.turn_sybils(candidates, n_sybils, cfg.junk_sybils)
        self.sybils = set(self.plane.sybils)
        self.free_nodes = candidates[n_sybils:]

    async def close_node(self, index: int) -> None:
        await self.plane.stacks[index].aclose()

    def honest_node(self) -> DHTNode:
        """A random live node that is not a sybil (clients and probes ask through it)."""
        servers = {s.index for s in self.servers}
        choices = [i for i in self.free_nodes if i not in servers] or [0]
        return self.nodes[self.rng.choice(choices)]

    # ---- servers ----
    def truth(self) -> list[_Server]:
        return [s for s in self.servers if s.alive and not s.moving]

    def uncovered_blocks(self) -> int:
        covered = [False] * self.cfg.blocks
        for s in self.truth():
            for b in s.layers:
                covered[b] = True
        return covered.count(False)

    def next_pings(self, s: _Server) -> tuple[PingEntry, ...]:
        """What ``s``'s announcer would measure of the servers of the block after its range:
        the one-way delay there and back, and (with ``probes``) what they deliver."""
        if s.layers.stop >= self.cfg.blocks:
            return ()
        nxt = [t for t in self.truth() if s.layers.stop in t.layers and t is not s][:MAX_PINGS]
        return tuple(
            PingEntry(
                t.peer_id,
                2 * self.delay[(s.region, t.region)],
                t.delivered if self.cfg.probes else 0.0,
            )
            for t in nxt
        )

    async def announce(self, s: _Server, state: ServerState = ServerState.ONLINE) -> None:
        relayed = s.kind is ServerKind.RELAYED
        value = ServerAnnouncement(
            host="127.0.0.1", port=s.port, layer_range=s.layers, state=state, dtype="float32",
            throughput=s.throughput, free_cache_tokens=1000, active_sessions=0, version="sim",
            moving_to=s.moving_to, last_move=s.last_move, next_pings=self.next_pings(s),
            reachability=Reachability.UNREACHABLE if relayed else Reachability.UNKNOWN,
            relays=(RelayHop(self.nodes[0].peer_id, "127.0.0.1", 1),) if relayed else (),
        ).to_wire()  # fmt: skip
        async with trio.open_nursery() as nursery:
            for b in s.layers:
                nursery.start_soon(s.node.announce, block_key(MODEL, b), value, self.cfg.ttl)

    async def read(self, node: DHTNode) -> list[ServerView]:
        found = await node.get_many(block_keys(MODEL, self.cfg.blocks))
        for records in found.values():
            self.count_forged(records.values())
        views = servers_from_records(found, MODEL, self.cfg.blocks)
        servers = {s.peer_id for s in self.servers}
        self.report.forged_accepted += sum(1 for v in views if v.peer_id not in servers)
        return views

    def count_forged(self, records: Iterable[Record]) -> None:
        """Count the records a lookup accepted that a sybil forged: they carry its mark (a
        sybil's own junk record, under its own id, is validly signed, so the DHT keeps it;
        the directory's decoder must drop it, which `read` checks)."""
        self.report.forged_accepted += sum(
            1 for r in records if r.value is not None and FORGED_MARK in r.value
        )

    async def run_server(self, s: _Server, *, task_status: trio.TaskStatus[None]) -> None:
        cfg = self.cfg

        async def intend(target: LayerRange | None) -> None:
            s.moving_to = target
            await self.announce(s)

        async def move(decision: Decision) -> None:
            s.moving = True
            await self.announce(s, ServerState.DRAINING)
            await trio.sleep(cfg.load_seconds)
            old, s.layers, s.moving_to = s.layers, decision.target, None
            assert decision.reason is not None
            s.last_move = RangeMove(old, decision.target, decision.reason, time.time(), 1.0)
            s.moving = False
            await self.announce(s)
            s.since = trio.current_time()
            self.report.moves += 1

        async def ping(view: ServerView) -> bool:
            """A modelled ``info`` call: answered after the round trip by a live server, or
            not, after ``ping_timeout``, by a dead one (its record outlives it)."""
            target = self.by_peer.get(view.peer_id)
            if target is None or not target.alive:
                await trio.sleep(cfg.ping_timeout)
                return False
            await trio.sleep(2 * self.delay[(s.region, target.region)])
            return True

        balance = BalanceConfig(
            enabled=True, period=cfg.period, settle=min(2.0, cfg.period / 2), recheck=0.2,
            watch=cfg.watch,
        )  # fmt: skip
        rebalancer = Rebalancer(
            balance, s.peer_id, cfg.blocks, read=lambda: self.read(s.node),
            current=lambda: s.layers, throughput=lambda: s.throughput, intend=intend, move=move,
            rng=random.Random(self.rng.random()), watch=PeerWatch(s.peer_id, cfg.blocks, ping),
        )  # fmt: skip
        started = False
        with s.scope:
            await self.announce(s)
            s.since = trio.current_time()
            task_status.started()
            started = True
            async with trio.open_nursery() as nursery:
                nursery.start_soon(rebalancer.run)
                while True:
                    await trio.sleep(cfg.ttl / 2)
                    if not s.moving:
                        await self.announce(s)
        if not started:  # killed (the mass departure) while announcing itself
            task_status.started()

    async def add_server(self, nursery: trio.Nursery, layers: LayerRange | None = None) -> None:
        if not self.free_nodes:
            return
        index = self.free_nodes.pop()
        node = self.nodes[index]
        if layers is None:  # --layers auto: the weakest window as read from the DHT
            views = await self.read(node)
            start = choose_start(block_throughputs(views, self.cfg.blocks), self.cfg.span)
            layers = LayerRange(start, start + self.cfg.span)
        cfg = self.cfg
        announced = self.rng.uniform(0.5, 2.0) * 50.0
        draw = self.rng.random()
        if draw < cfg.slow_share:
            kind, delivers = ServerKind.SLOW, cfg.slow_delivers
        elif draw < cfg.slow_share + cfg.relayed_share:
            kind, delivers = ServerKind.RELAYED, cfg.relayed_delivers
        else:
            kind, delivers = ServerKind.FAST, 1.0
        s = _Server(
            index, node, self.region[index], announced, layers, kind=kind,
            delivered=announced * delivers, port=20000 + index,
        )  # fmt: skip
        self.servers.append(s)
        self.by_peer[s.peer_id] = s
        await nursery.start(self.run_server, s)

    async def kill(self, s: _Server) -> None:
        s.alive = False
        s.scope.cancel()
        await self.close_node(s.index)  # its socket closes; its records stay until expiry

    # ---- clients ----
    def plan(
        self, views: Sequence[ServerView], client_region: str, banned: Collection[PeerId] = ()
    ) -> tuple[float, list[ServerView]]:
        """Cheapest chain over block boundaries: per hop the one-way delay from the previous
        hop (or the client) plus blocks / throughput; the last hop's delay back included.
        Like `swarm.client.routing.plan_route`: online servers only, ``banned`` ones left
        out, a server that announced a move (``moving_to``) still used (it serves its old
        range until it drains), and each at the throughput its peers measured it
        delivering where that is less than it announces (`counted_throughput`)."""
        blocks = self.cfg.blocks
        region_of = {s.peer_id: s.region for s in self.servers}
        usable = [
            v for v in views
            if v.state == ServerState.ONLINE and v.peer_id not in banned and v.peer_id in region_of
        ]  # fmt: skip
        measured = delivered_by_peers(views)  # as `plan_route`: what peers measured counts
        speed = {v.peer_id: counted_throughput(v, measured.get(v.peer_id)) for v in usable}
        best: dict[tuple[int, str], float] = {(0, client_region): 0.0}
        back: dict[tuple[int, str], tuple[tuple[int, str], ServerView]] = {}
        queue: list[tuple[float, int, str]] = [(0.0, 0, client_region)]
        while queue:
            cost, at, region = heapq.heappop(queue)
            if cost > best.get((at, region), math.inf):
                continue
            for v in usable:
                if not v.layers.start <= at < v.layers.stop:
                    continue
                r = region_of[v.peer_id]
                used = (v.layers.stop - at) / len(v.layers)  # throughput is the whole span's
                step = self.delay[(region, r)] + used / speed[v.peer_id]
                key = (v.layers.stop, r)
                if cost + step < best.get(key, math.inf):
                    best[key] = cost + step
                    back[key] = ((at, region), v)
                    heapq.heappush(queue, (cost + step, v.layers.stop, r))
        ends = [
            (c + self.delay[(r, client_region)], (b, r))
            for (b, r), c in best.items()
            if b == blocks
        ]
        if not ends:
            return math.inf, []
        total, key = min(ends)
        route: list[ServerView] = []
        while key in back:
            key, v = back[key]
            route.append(v)
        return total, route[::-1]

    async def run_client(self, index: int) -> None:
        """Generate one after another, as the product's client does (`swarm.client`): a
        generation starts once a route exists (looking again every second for up to
        ``client_wait``, as ``swarm generate --wait`` does), servers that failed it are
        banned with the product's backoff (`BanList`, `FailureConfig`), a failed hop is
        recovered onto a fresh route (waiting for one up to ``FailureConfig.route_wait_s``)
        at most ``FailureConfig.max_recoveries`` times."""
        region = REGIONS[index % len(REGIONS)]
        f = self.failure_config
        bans = BanList(f.ban_base_s, f.ban_backoff, f.ban_max_s)
        while True:
            self.report.started += 1
            views, route, waited = await self.find_route(region, bans, (), self.cfg.client_wait)
            self.report.start_waits.append(waited)
            if not route:
                self.report.generations += 1
                self.fail(self.no_route_cause(views, recovering=False))
                continue
            cost = self._route_cost(route, region)[0]
            oracle, _ = self.plan([s.view() for s in self.truth()], region)
            if math.isfinite(oracle) and oracle > 0:
                self.report.route_ratio.append(cost / oracle)
            began = trio.current_time()
            cause = await self.generate(route, region, bans)
            log.debug("generation: %.1f s, %s", trio.current_time() - began, cause or "ok")
            self.report.generations += 1  # counted when it ended (the last may not)
            if cause is None:
                self.report.succeeded += 1
            else:
                self.fail(cause)

    async def find_route(
        self,
        region: str,
        bans: BanList,
        gone: Collection[tuple[PeerId, LayerRange]],
        wait: float,
    ) -> tuple[list[ServerView], list[ServerView], float]:
        """Read the directory and plan (a second read when the first finds no route, as
        `HopOpener.plan` does); with ``wait`` > 0, keep looking that long, spaced as
        `FailureConfig.route_look_s`. Records of a server for a range it was found to have
        left (``gone``: it moved) are passed over, as stale. Returns the last views read,
        the route ([]: none) and the seconds it waited between looks (0 when the first look
        found a route)."""
        started = trio.current_time()
        deadline = started + wait
        views: list[ServerView] = []
        looks = 0
        while True:
            looks += 1
            for _ in range(2):
                try:
                    views = await self.read(self.honest_node())
                except SwarmError:
                    views = []
                fresh = [v for v in views if (v.peer_id, v.layers) not in gone]
                _, route = self.plan(fresh, region, bans.banned())
                if route:
                    self.count_stale(route)
                    return views, route, (trio.current_time() - started if looks > 1 else 0.0)
            left = deadline - trio.current_time()
            if left <= 0:
                return views, [], trio.current_time() - started
            await trio.sleep(min(self.failure_config.route_look_s(looks), left))

    def fail(self, cause: Failure) -> None:
        self.report.failures[cause] = self.report.failures.get(cause, 0) + 1

    def no_route_cause(self, views: Sequence[ServerView], *, recovering: bool) -> Failure:
        if self.uncovered_blocks():
            return Failure.RECOVERY_UNCOVERED if recovering else Failure.START_UNCOVERED
        seen = {v.peer_id for v in views}
        if any(s.peer_id not in seen for s in self.truth()):
            return Failure.RECOVERY_MISSED if recovering else Failure.START_MISSED
        return Failure.RECOVERY_OTHER if recovering else Failure.START_OTHER

    def count_stale(self, route: Sequence[ServerView]) -> None:
        alive = {s.peer_id: s for s in self.servers}
        self.report.stale_picks += sum(
            1 for v in route if not self._serves(alive.get(v.peer_id), v.layers)
        )

    async def generate(self, route: list[ServerView], region: str, bans: BanList) -> Failure | None:
        """Sleep each token's modelled cost; a hop whose server died meanwhile is banned, one
        that moved or is moving is not (it answers ``unavailable``: blameless; its records
        for the range it left are passed over), and the chain is re-planned from a fresh
        read (a recovery; the replay of the tokens so far is not modelled). Returns None, or
        why the generation failed."""
        done = 0
        recoveries = 0
        gone: set[tuple[PeerId, LayerRange]] = set()
        max_recoveries = self.failure_config.max_recoveries
        while done < self.cfg.tokens:
            cost, _ = self._route_cost(route, region)
            started = trio.current_time()
            await trio.sleep(cost)
            alive = {s.peer_id: s for s in self.servers}  # (arrivals since it started too)
            broken = [v for v in route if not self._serves(alive.get(v.peer_id), v.layers)]
            if broken:
                for v in broken:
                    server = alive.get(v.peer_id)
                    if server is None or not server.alive:
                        bans.ban(v.peer_id)
                    else:  # moving or moved: blameless, not banned
                        gone.add((v.peer_id, v.layers))
                recoveries += 1
                if recoveries > max_recoveries:
                    return Failure.GAVE_UP
                views, route, waited = await self.find_route(
                    region, bans, gone, self.failure_config.route_wait_s
                )
                self.report.recovery_waits.append(waited)
                if not route:
                    return self.no_route_cause(views, recovering=True)
                self.report.recoveries += 1
                continue
            done += 1
            self.report.token_seconds.append(trio.current_time() - started)
        return None

    @staticmethod
    def _serves(s: _Server | None, layers: LayerRange) -> bool:
        return s is not None and s.alive and not s.moving and s.layers == layers

    def _route_cost(self, route: list[ServerView], region: str) -> tuple[float, str]:
        """A token's real cost along ``route``: link delays, and each hop's compute at the
        throughput its server really delivers (not the one it announces)."""
        by_peer = {s.peer_id: s for s in self.servers}
        total, at = 0.0, region
        for v in route:
            server = by_peer[v.peer_id]
            total += self.delay[(at, server.region)] + 1.0 / server.delivered
            at = server.region
        return total + self.delay[(at, region)], at

    async def watch_throughput(self) -> None:
        """Every few seconds, read the directory as a server does and record, per kind of
        server, what the balance counts them at (`delivered_throughput`) beside what they
        announce and really deliver."""
        while True:
            await trio.sleep(5.0)
            try:
                views = await self.read(self.honest_node())
            except SwarmError:
                continue
            measured = delivered_by_peers(views)
            live = {s.peer_id: s for s in self.truth()}
            sums: dict[ServerKind, dict[str, float]] = {}
            for v in views:
                server = live.get(v.peer_id)
                if server is None or v.layers != server.layers:
                    continue
                row = sums.setdefault(server.kind, dict.fromkeys(_THROUGHPUT_COLUMNS, 0.0))
                row["servers"] += 1
                row["announced"] += v.throughput
                row["delivered"] += server.delivered
                row["counted"] += delivered_throughput(v, measured=measured.get(v.peer_id))
                row["measured_by_peers"] += v.peer_id in measured
            self.report.throughput = dict(sorted(sums.items()))

    # ---- probes ----
    async def probe_lookups(self) -> None:
        while True:
            await trio.sleep(0.3)
            block = self.rng.randrange(self.cfg.blocks)
            now = trio.current_time()
            settled = {  # servers of the block whose record had a second to land
                s.peer_id for s in self.truth() if block in s.layers and now - s.since > 1.0
            }
            node = self.honest_node()
            started = trio.current_time()
            try:
                found = await node.get(block_key(MODEL, block))
            except SwarmError:
                continue
            self.report.lookup_seconds.append(trio.current_time() - started)
            self.count_forged(found.values())
            if settled:
                self.report.lookup_recall.append(len(settled & set(found)) / len(settled))

    async def watch_coverage(self) -> None:
        last = -1
        while True:
            now = self.uncovered_blocks()
            if now != last:
                self.report.uncovered.append((trio.current_time() - self.started, now))
                last = now
            await trio.sleep(0.1)

    async def churn(self, nursery: trio.Nursery) -> None:
        cfg = self.cfg
        if cfg.churn_per_minute <= 0:
            return
        while True:
            await trio.sleep(self.rng.expovariate(cfg.churn_per_minute / 60.0))
            alive = [s for s in self.servers if s.alive]
            if len(alive) > 1 and self.rng.random() < 0.5:
                await self.kill(self.rng.choice(alive))
            else:
                await self.add_server(nursery)

    async def mass_leave(self) -> None:
        cfg = self.cfg
        await trio.sleep(cfg.mass_leave_at)
        alive = [s for s in self.servers if s.alive]
        gone = self.rng.sample(alive, max(1, int(cfg.mass_leave_share * len(alive))))
        if cfg.mass_leave_gap:
            block = self.rng.randrange(cfg.blocks)
            gone += [s for s in alive if block in s.layers and s not in gone]
        left = trio.current_time()
        for s in gone:
            await self.kill(s)
        log.info("mass departure: %d of %d servers left", len(gone), len(alive))
        while self.uncovered_blocks() == 0:  # the departure may leave every block covered
            await trio.sleep(0.05)
            if trio.current_time() - left > 1.0:
                self.report.heal_seconds = 0.0
                return
        while self.uncovered_blocks() > 0:
            await trio.sleep(0.05)
        self.report.heal_seconds = trio.current_time() - left


async def run_simulation(config: SimConfig) -> SimReport:
    """Run one simulated swarm for ``config.duration`` seconds and return its figures
    (with ``config.processes`` > 1, part of the DHT nodes in worker processes, which it
    starts and stops)."""
    sim = _Sim(config)
    try:
        await sim.open_nodes()
        async with open_workers(sim.worker_specs()) as workers:
            await sim.open_rest()  # while the workers open theirs
            for worker in workers:
                await worker.wait_ready()
            await _run(sim, workers)
    finally:
        log.info("run over; closing %d DHT nodes", len(sim.nodes))
        await sim.plane.aclose()
    return sim.report


def _windowed(after: SliceStatistics, before: SliceStatistics) -> SliceStatistics:
    return SliceStatistics(
        honest=after.honest,
        datagrams=after.datagrams - before.datagrams,
        bytes=after.bytes - before.bytes,
        lost=after.lost - before.lost,
        junk_replies=after.junk_replies - before.junk_replies,
        forged_sent=after.forged_sent - before.forged_sent,
        signatures_verified=after.signatures_verified - before.signatures_verified,
        signatures_cached=after.signatures_cached - before.signatures_cached,
    )


async def _run(sim: _Sim, workers: list[Worker]) -> None:
    config = sim.cfg
    async with trio.open_nursery() as nursery:
        async with trio.open_nursery() as starting:  # all at once, spread evenly
            for i in range(config.servers):
                start = (i * config.span) % (config.blocks - config.span + 1)
                starting.start_soon(sim.add_server, nursery, LayerRange(start, start + config.span))
        log.info("%d servers up; running for %.0f s", config.servers, config.duration)
        sim.started = trio.current_time()
        before = sim.plane.statistics()
        for worker in workers:
            await worker.go()
        nursery.start_soon(sim.watch_coverage)
        nursery.start_soon(sim.probe_lookups)
        nursery.start_soon(sim.watch_throughput)
        nursery.start_soon(sim.churn, nursery)
        if config.mass_leave_at > 0:
            nursery.start_soon(sim.mass_leave)
        for c in range(config.clients):
            nursery.start_soon(sim.run_client, c)
        await trio.sleep(config.duration)
        if config.mass_leave_at > 0:
            with trio.move_on_after(config.heal_grace):
                while sim.report.heal_seconds is None:
                    await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    slices = [_windowed(sim.plane.statistics(), before)]
    for worker in workers:
        slices.append(await worker.stop())
    sim.report.seconds = trio.current_time() - sim.started
    minutes = sim.report.seconds / 60.0
    honest = sum(s.honest for s in slices)
    report = sim.report
    report.slices = slices
    report.datagrams_per_node_minute = sum(s.datagrams for s in slices) / honest / minutes
    report.bytes_per_node_minute = sum(s.bytes for s in slices) / honest / minutes
    report.lost_datagrams = sum(s.lost for s in slices)
    report.junk_replies = sum(s.junk_replies for s in slices)
    report.forged_sent = sum(s.forged_sent for s in slices)
    report.signatures_verified = sum(s.signatures_verified for s in slices)
    report.signatures_cached = sum(s.signatures_cached for s in slices)
