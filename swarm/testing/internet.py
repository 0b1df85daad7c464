"""An internet-sized swarm, simulated in one or a few processes: the DHT plane real, the
compute plane modelled (for `benchmarks/internet.py` and a small run in the test suite).

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
``client_wait`` for a route before it starts (``swarm generate --wait``); it opens the
route first, as `HopOpener.open` does (servers gone since their records were read fail
there together after ``connect_timeout``, are all banned and the range re-planned, at most
``max_open_retries`` times); a server dead for one of its ping intervals ranks far lower,
as unreachable (`PingConfig.interval_s`, `RouteCosts.unreachable`); a hop that died
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

Processes (``processes`` > 1): this process, the coordinator, hosts half a worker's share
of the DHT nodes and all the logic, truth and figures; workers
(`swarm.testing.internet_workers`) host the rest. Servers, clients and probes act through
honest nodes of every process, in proportion, and an operation through a worker's node runs
there (`swarm.testing.internet_ops`); values come back through the strict decoder and
forgeries are counted. Each process's DHT loop lag (`LoopLag`) is reported beside the
lookups' latency. Run parameters and figures: `swarm.testing.internet_model`; clients:
`swarm.testing.internet_clients`.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable, Sequence

import trio

from swarm.client.config import FailureConfig
from swarm.dht import Record
from swarm.directory import (
    ServerView,
    block_key,
    block_keys,
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
from swarm.testing.internet_clients import SimClient
from swarm.testing.internet_model import Failure, ServerKind, SimConfig, SimReport, SimServer
from swarm.testing.internet_ops import LocalNode, SimNode
from swarm.testing.internet_plane import MODEL, DHTSlice, freeze_heap, region_of
from swarm.testing.internet_workers import Worker, WorkerSpec, open_workers
from swarm.testing.sybils import FORGED_MARK
from swarm.types import LayerRange, PeerId, Reachability, ServerState

__all__ = ["Failure", "ServerKind", "SimConfig", "SimReport", "run_simulation"]

log = logging.getLogger(__name__)


_THROUGHPUT_COLUMNS = ("servers", "announced", "delivered", "counted", "measured_by_peers")


class Simulation:
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
        self.sybils: set[int] = set()
        self.servers: list[SimServer] = []
        self.by_peer: dict[PeerId, SimServer] = {}
        # honest nodes of every process that no server uses yet; `add_server` pops the last
        self.free_nodes: list[SimNode] = []
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
        a worker's share (it also runs the logic of every server, client and probe, and
        decodes what they read; their DHT operations go through nodes of every process, in
        proportion to the nodes each hosts)."""
        cfg = self.cfg
        if cfg.processes <= 1:
            return cfg.dht_nodes
        return max(1, cfg.dht_nodes // (2 * cfg.processes - 1))

    async def open_nodes(self) -> None:
        """Open this process's nodes (workers' join through the first; see `run_simulation`)."""
        await self.plane.open(1)

    async def open_rest(self) -> None:
        cfg = self.cfg
        local = self.local_nodes()
        await self.plane.open(local - 1)
        log.info("%d DHT nodes up in this process", local)
        self.plane.joined()
        candidates = list(range(1, local))
        self.rng.shuffle(candidates)
        n_sybils = int(cfg.sybil_share * local)
        await self.plane.turn_sybils(candidates, n_sybils, cfg.junk_sybils)
        self.sybils = set(self.plane.sybils)
        self.free_nodes = [self.local_node(i) for i in candidates[n_sybils:]]

    def local_node(self, index: int) -> LocalNode:
        return LocalNode(self.nodes[index], self.plane.stacks[index])

    def add_workers(self, workers: Sequence[Worker]) -> None:
        """Pool the workers' honest nodes with ours, in an order that takes from each
        process in proportion to the nodes it offers (servers pop from the end)."""
        ranked: list[tuple[float, SimNode]] = []
        groups: list[Sequence[SimNode]] = [self.free_nodes, *(w.nodes for w in workers)]
        for group in groups:
            nodes = list(group)
            self.rng.shuffle(nodes)
            ranked += [((k + self.rng.random()) / len(nodes), n) for k, n in enumerate(nodes)]
        ranked.sort(key=lambda kn: kn[0], reverse=True)
        self.free_nodes = [node for _, node in ranked]
        log.info("%d honest nodes free for servers, clients and probes", len(self.free_nodes))

    def honest_node(self) -> SimNode:
        """A random live node that is not a sybil nor a server's (clients and probes ask
        through it), in any process."""
        return self.rng.choice(self.free_nodes) if self.free_nodes else self.local_node(0)

    # ---- servers ----
    def truth(self) -> list[SimServer]:
        return [s for s in self.servers if s.alive and not s.moving]

    def uncovered_blocks(self) -> int:
        covered = [False] * self.cfg.blocks
        for s in self.truth():
            for b in s.layers:
                covered[b] = True
        return covered.count(False)

    def next_pings(self, s: SimServer) -> tuple[PingEntry, ...]:
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

    async def announce(self, s: SimServer, state: ServerState = ServerState.ONLINE) -> None:
        relayed = s.kind is ServerKind.RELAYED
        value = ServerAnnouncement(
            host="127.0.0.1", port=s.port, layer_range=s.layers, state=state, dtype="float32",
            throughput=s.throughput, free_cache_tokens=1000, active_sessions=0, version="sim",
            moving_to=s.moving_to, last_move=s.last_move, next_pings=self.next_pings(s),
            reachability=Reachability.UNREACHABLE if relayed else Reachability.UNKNOWN,
            relays=(RelayHop(self.nodes[0].peer_id, "127.0.0.1", 1),) if relayed else (),
        ).to_wire()  # fmt: skip
        keys = [block_key(MODEL, b) for b in s.layers]
        try:
            await s.node.announce_many(keys, value, self.cfg.ttl)
        except SwarmError as exc:  # as lost stores: readers miss it until the next announce
            log.info("announcing %s failed: %s", s.layers, exc)
            self.count(s.node, failed=True)
        else:
            self.count(s.node)

    def count(self, node: SimNode, *, failed: bool = False) -> None:
        """Count a DHT operation through ``node`` (`SimReport.operations`)."""
        self.report.operations[node.process] = self.report.operations.get(node.process, 0) + 1
        self.report.operations_failed += failed

    async def read(self, node: SimNode) -> list[ServerView]:
        try:
            found = await node.get_many(block_keys(MODEL, self.cfg.blocks))
        except SwarmError:
            self.count(node, failed=True)
            raise
        self.count(node)
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

    async def run_server(self, s: SimServer, *, task_status: trio.TaskStatus[None]) -> None:
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
        node = self.free_nodes.pop()
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
        s = SimServer(
            node, region_of(("127.0.0.1", node.port)), announced, layers, kind=kind,
            delivered=announced * delivers, port=node.port,
        )  # fmt: skip
        self.servers.append(s)
        self.by_peer[s.peer_id] = s
        await nursery.start(self.run_server, s)

    async def kill(self, s: SimServer) -> None:
        s.alive = False
        s.died_at = trio.current_time()
        s.scope.cancel()
        await s.node.aclose()  # its socket closes; its records stay until expiry

    # ---- clients ----
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
                self.count(node, failed=True)
                continue
            self.count(node)
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
    sim = Simulation(config)
    try:
        await sim.open_nodes()
        async with open_workers(sim.worker_specs()) as workers:
            await sim.open_rest()  # while the workers open theirs
            for worker in workers:
                await worker.wait_ready()
            sim.add_workers(workers)
            await _run(sim, workers)
    finally:
        log.info("run over; closing %d DHT nodes", len(sim.nodes))
        await sim.plane.aclose()
    return sim.report


async def _run(sim: Simulation, workers: list[Worker]) -> None:
    config = sim.cfg
    async with trio.open_nursery() as nursery:
        async with trio.open_nursery() as starting:  # all at once, spread evenly
            for i in range(config.servers):
                start = (i * config.span) % (config.blocks - config.span + 1)
                starting.start_soon(sim.add_server, nursery, LayerRange(start, start + config.span))
        log.info("%d servers up; running for %.0f s", config.servers, config.duration)
        freeze_heap()
        await sim.plane.watch_lag()
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
            nursery.start_soon(SimClient(sim, c).run)
        await trio.sleep(config.duration)
        if config.mass_leave_at > 0:
            with trio.move_on_after(config.heal_grace):
                uncovered = sim.report.uncovered
                while sim.report.heal_seconds is None or (uncovered and uncovered[-1][1] > 0):
                    await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    slices = [sim.plane.statistics().since(before)]
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
