"""The simulated internet's clients (`swarm.testing.internet`): each generates one
generation after another over the routes it plans from what it read in the DHT, with the
product client's failure policy, and counts what happened in the run's `SimReport`."""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

import trio

from swarm.client.bans import BanList
from swarm.client.config import PingConfig
from swarm.client.routing import RouteCosts
from swarm.directory import ServerView, counted_throughput, delivered_by_peers
from swarm.errors import SwarmError
from swarm.net.config import DEFAULT_NET_CONFIG
from swarm.testing.internet_model import Failure, SimServer
from swarm.testing.internet_plane import REGIONS
from swarm.types import LayerRange, PeerId, ServerState

if TYPE_CHECKING:
    from swarm.testing.internet import Simulation

__all__ = ["SimClient"]

log = logging.getLogger(__name__)

PINGS = PingConfig()  # the product client's defaults
ROUTE_COSTS = RouteCosts()


class SimClient:
    """Client ``index`` of ``sim`` (its region is the index's, round robin); `run` until
    cancelled."""

    def __init__(self, sim: Simulation, index: int) -> None:
        self.sim = sim
        self.index = index

    def plan(
        self, views: Sequence[ServerView], client_region: str, banned: Collection[PeerId] = ()
    ) -> tuple[float, list[ServerView]]:
        """Cheapest chain over block boundaries: per hop the one-way delay from the previous
        hop (or the client) plus blocks / throughput; the last hop's delay back included.
        Like `swarm.client.routing.plan_route`: online servers only, ``banned`` ones left
        out, a server that announced a move (``moving_to``) still used (it serves its old
        range until it drains), and each at the throughput its peers measured it
        delivering where that is less than it announces (`counted_throughput`), and a dead
        server the client's pings found gone ranked far lower, as unreachable (`_unreachable`)."""
        blocks = self.sim.cfg.blocks
        region_of = {s.peer_id: s.region for s in self.sim.servers}
        usable = [
            v for v in views
            if v.state == ServerState.ONLINE and v.peer_id not in banned and v.peer_id in region_of
        ]  # fmt: skip
        measured = delivered_by_peers(views)  # as `plan_route`: what peers measured counts
        speed = {v.peer_id: counted_throughput(v, measured.get(v.peer_id)) for v in usable}
        unreachable = self._unreachable()
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
                step = self.sim.delay[(region, r)] + used / speed[v.peer_id]
                if v.peer_id in unreachable:  # as `plan_route`: unproven, and its ping failed
                    step *= (1 + ROUTE_COSTS.unproven) * (1 + ROUTE_COSTS.unreachable)
                key = (v.layers.stop, r)
                if cost + step < best.get(key, math.inf):
                    best[key] = cost + step
                    back[key] = ((at, region), v)
                    heapq.heappush(queue, (cost + step, v.layers.stop, r))
        ends = [
            (c + self.sim.delay[(r, client_region)], (b, r))
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

    async def run(self) -> None:
        """Generate one after another, as the product's client does (`swarm.client`): a
        generation starts once a route exists (looking again every second for up to
        ``client_wait``, as ``swarm generate --wait`` does), servers that failed it are
        banned with the product's backoff (`BanList`, `FailureConfig`), a failed hop is
        recovered onto a fresh route (waiting for one up to ``FailureConfig.route_wait_s``)
        at most ``FailureConfig.max_recoveries`` times."""
        region = REGIONS[self.index % len(REGIONS)]
        f = self.sim.failure_config
        bans = BanList(f.ban_base_s, f.ban_backoff, f.ban_max_s)
        while True:
            self.sim.report.started += 1
            views, route, waited = await self.find_route(region, bans, (), self.sim.cfg.client_wait)
            self.sim.report.start_waits.append(waited)
            if not route:
                self.sim.report.generations += 1
                self.fail(self.no_route_cause(views, recovering=False))
                continue
            cost = self._route_cost(route, region)[0]
            oracle, _ = self.plan([s.view() for s in self.sim.truth()], region)
            if math.isfinite(oracle) and oracle > 0:
                self.sim.report.route_ratio.append(cost / oracle)
            began = trio.current_time()
            cause = await self.generate(route, region, bans)
            log.debug("generation: %.1f s, %s", trio.current_time() - began, cause or "ok")
            self.sim.report.generations += 1  # counted when it ended (the last may not)
            if cause is None:
                self.sim.report.succeeded += 1
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
                    views = await self.sim.read(self.sim.honest_node())
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
            await trio.sleep(min(self.sim.failure_config.route_look_s(looks), left))

    def fail(self, cause: Failure) -> None:
        self.sim.report.failures[cause] = self.sim.report.failures.get(cause, 0) + 1

    def no_route_cause(self, views: Sequence[ServerView], *, recovering: bool) -> Failure:
        if self.sim.uncovered_blocks():
            return Failure.RECOVERY_UNCOVERED if recovering else Failure.START_UNCOVERED
        seen = {v.peer_id for v in views}
        if any(s.peer_id not in seen for s in self.sim.truth()):
            return Failure.RECOVERY_MISSED if recovering else Failure.START_MISSED
        return Failure.RECOVERY_OTHER if recovering else Failure.START_OTHER

    def count_stale(self, route: Sequence[ServerView]) -> None:
        alive = {s.peer_id: s for s in self.sim.servers}
        self.sim.report.stale_picks += sum(
            1 for v in route if not self._serves(alive.get(v.peer_id), v.layers)
        )

    async def generate(self, route: list[ServerView], region: str, bans: BanList) -> Failure | None:
        """Open ``route`` (`open`: servers gone since their records were read fail there, as
        in the product, not as recoveries), then sleep each token's modelled cost; a hop
        whose server died meanwhile is banned, one
        that moved or is moving is not (it answers ``unavailable``: blameless; its records
        for the range it left are passed over), and the chain is re-planned from a fresh
        read (a recovery; the replay of the tokens so far is not modelled). Returns None, or
        why the generation failed."""
        done = 0
        recoveries = 0
        gone: set[tuple[PeerId, LayerRange]] = set()
        max_recoveries = self.sim.failure_config.max_recoveries
        opened = await self.open(route, region, bans, gone, 0.0)
        if isinstance(opened, Failure):
            return opened
        route = opened
        while done < self.sim.cfg.tokens:
            cost, _ = self._route_cost(route, region)
            started = trio.current_time()
            await trio.sleep(cost)
            alive = {s.peer_id: s for s in self.sim.servers}  # (arrivals since it started too)
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
                wait = self.sim.failure_config.route_wait_s
                views, route, waited = await self.find_route(region, bans, gone, wait)
                self.sim.report.recovery_waits.append(waited)
                if not route:
                    return self.no_route_cause(views, recovering=True)
                opened = await self.open(route, region, bans, gone, wait)
                if isinstance(opened, Failure):
                    return opened
                route = opened
                self.sim.report.recoveries += 1
                continue
            done += 1
            self.sim.report.token_seconds.append(trio.current_time() - started)
        return None

    async def open(
        self,
        route: list[ServerView],
        region: str,
        bans: BanList,
        gone: set[tuple[PeerId, LayerRange]],
        wait: float,
    ) -> list[ServerView] | Failure:
        """Open ``route`` as the product's `HopOpener.open` does: all hops at once; a hop
        whose server is gone since its record was read fails to open (after
        ``connect_timeout``: a vanished machine answers nothing); every failed hop is
        banned (one that moved is passed over, blameless) and the route planned again, up
        to ``max_open_retries`` failed attempts. Returns the opened route or why it failed."""
        failures = 0
        while True:
            alive = {s.peer_id: s for s in self.sim.servers}
            broken = [v for v in route if not self._serves(alive.get(v.peer_id), v.layers)]
            if not broken:
                return route
            if any(not self._alive(alive.get(v.peer_id)) for v in broken):
                await trio.sleep(DEFAULT_NET_CONFIG.connect_timeout)  # the dials end together
            # as `HopOpener.open`: every failed hop is banned (a server moving or moved
            # answers ``unavailable``: passed over), the attempt counts once, and the rest
            # of the range is planned again
            for view in broken:
                if self._alive(alive.get(view.peer_id)):
                    gone.add((view.peer_id, view.layers))
                else:
                    bans.ban(view.peer_id)
            failures += 1
            self.sim.report.open_failures += len(broken)
            if failures > self.sim.failure_config.max_open_retries:
                return Failure.OPEN_GAVE_UP
            views, route, _ = await self.find_route(region, bans, gone, wait)
            if not route:
                return self.no_route_cause(views, recovering=wait > 0)

    def _unreachable(self) -> set[PeerId]:
        """Servers the product's client would know gone: it pings the servers it reached
        every ``PingConfig.interval_s``, and one whose ping failed is unproven and
        unreachable in `plan_route` (``RouteCosts.unproven``, ``RouteCosts.unreachable``);
        so a dead server counts as such from one ping interval and timeout after its death."""
        now = trio.current_time()
        known = PINGS.interval_s + PINGS.timeout
        return {
            s.peer_id for s in self.sim.servers
            if s.died_at is not None and now - s.died_at >= known
        }  # fmt: skip

    @staticmethod
    def _alive(s: SimServer | None) -> bool:
        return s is not None and s.alive

    @staticmethod
    def _serves(s: SimServer | None, layers: LayerRange) -> bool:
        return s is not None and s.alive and not s.moving and s.layers == layers

    def _route_cost(self, route: list[ServerView], region: str) -> tuple[float, str]:
        """A token's real cost along ``route``: link delays, and each hop's compute at the
        throughput its server really delivers (not the one it announces)."""
        by_peer = {s.peer_id: s for s in self.sim.servers}
        total, at = 0.0, region
        for v in route:
            server = by_peer[v.peer_id]
            total += self.sim.delay[(at, server.region)] + 1.0 / server.delivered
            at = server.region
        return total + self.sim.delay[(at, region)], at
