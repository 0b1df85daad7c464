"""Telling the swarm about this server: DHT announcements and next-hop pings.

A server announces one record per block it serves, under `swarm.directory.block_key`, with
a TTL of `ServerConfig.announce_ttl`, and re-announces every half TTL, so a server that
dies vanishes from the DHT within one TTL. Each record carries the round-trip times to up
to `MAX_PINGS` servers of the block right after our range, which the client's route
planner uses as the cost of the server-to-server link, and (with ``probe_hidden``) the
tokens per second each of them delivered for a timed one-token ``forward`` through its
span, which rebalancing counts it at where that is below what it announces
(`swarm.server.balance.delivered_throughput`): a third party's measure, which the measured
server cannot raise.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

import torch
import trio

from swarm.dht import DHTNode
from swarm.directory import (
    MAX_THROUGHPUT,
    ServerView,
    announce_model_id,
    block_key,
    block_keys,
    delivered_by_peers,
    servers_from_records,
)
from swarm.errors import SwarmError
from swarm.net.messages import ForwardRequest, PingEntry, ServerAnnouncement
from swarm.net.pool import ConnectionPool
from swarm.net.punch import PunchConfig
from swarm.net.rpc import RpcConnection
from swarm.net.surface import call_forward, call_info
from swarm.server.balance import delivered_throughput
from swarm.types import LayerRange, PeerId, ServerState, parse_address

__all__ = [
    "MAX_PINGS",
    "PROBES",
    "Announcer",
    "choose_layers",
]

log = logging.getLogger(__name__)

MAX_PINGS = 5
PROBES = 4  # a next server's delivered tokens/s: the best of this many last probes
_PROBE_FLOOR_S = 1e-4  # a probe's compute time is never taken as less (10,000 tokens/s)


async def choose_layers(
    dht: DHTNode, model_id: str, num_layers: int, num_blocks: int
) -> LayerRange:
    """The window of `num_blocks` consecutive blocks with the least announced throughput
    (online and joining servers count with what they deliver:
    `swarm.server.balance.delivered_throughput`; ties go to the earliest window).
    Announcements are read with `swarm.directory.servers_from_records`, as clients read
    them."""
    found = await dht.get_many(block_keys(model_id, num_layers))
    per_block = [0.0] * num_layers
    views = servers_from_records(found, model_id, num_layers)
    measured = delivered_by_peers(views)
    for view in views:
        if view.state != ServerState.DRAINING:
            for block in view.layers:
                per_block[block] += delivered_throughput(view, measured=measured.get(view.peer_id))
    num_blocks = min(num_blocks, num_layers)
    windows = [sum(per_block[s : s + num_blocks]) for s in range(num_layers - num_blocks + 1)]
    start = min(range(len(windows)), key=lambda s: (windows[s], s))
    return LayerRange(start, start + num_blocks)


class Announcer:
    """Builds and publishes this server's records, and measures pings to the next hop."""

    def __init__(
        self,
        dht: DHTNode,
        pool: ConnectionPool,
        model_id: str,
        layers: LayerRange,
        num_layers: int,
        ttl: float,
        ping_timeout: float,
        make_announcement: Callable[[tuple[PingEntry, ...]], ServerAnnouncement],
        direct: PunchConfig | None = None,
        probe_hidden: int | None = None,
    ) -> None:
        self.dht = dht
        self.probe_hidden = probe_hidden  # the model's hidden size: probe next servers' speed
        self.direct = direct  # try direct connections to relayed next servers (pushes)
        self.pool = pool
        self.model_id = model_id
        self.layers = layers
        self.num_layers = num_layers
        self.ttl = ttl
        self.ping_timeout = ping_timeout
        self._make = make_announcement
        self.pings: dict[PeerId, float] = {}
        self._probes: dict[PeerId, deque[float]] = {}  # tokens/s of the last probes
        self.announces = 0

    def move_to(self, layers: LayerRange) -> None:
        """Announce under ``layers``' block keys from now on (pings to the old next hop go)."""
        self.layers = layers
        self.pings.clear()
        self._probes.clear()

    async def announce(self) -> None:
        """Publish the current record under every block key we serve (concurrently)."""
        delivered = self.delivered
        pings = tuple(
            PingEntry(peer, rtt, delivered.get(peer, 0.0))
            for peer, rtt in list(self.pings.items())[:MAX_PINGS]
        )
        value = self._make(pings).to_wire()

        async def one(block: int) -> None:
            try:
                await self.dht.announce(block_key(self.model_id, block), value, self.ttl)
            except SwarmError as exc:
                log.warning("announcing block %d failed: %s", block, exc)

        async def family() -> None:
            try:
                await announce_model_id(self.dht, self.model_id, self.ttl)
            except SwarmError as exc:
                log.info("announcing the model id failed: %s", exc)

        async with trio.open_nursery() as nursery:
            for block in self.layers:
                nursery.start_soon(one, block)
            nursery.start_soon(family)
        self.announces += 1

    async def measure_next_pings(self) -> None:
        """RTTs (EMA, alpha 0.2) to up to `MAX_PINGS` servers of the block after our range."""
        if self.layers.stop >= self.num_layers:
            return
        block = self.layers.stop
        key = block_key(self.model_id, block)
        records = {key: await self.dht.get(key)}
        servers = servers_from_records(
            records, self.model_id, self.num_layers, range(block, block + 1)
        )
        targets = [
            view
            for view in servers
            if view.state == ServerState.ONLINE and view.peer_id != self.dht.peer_id
        ][:MAX_PINGS]

        async def ping(view: ServerView) -> None:
            peer = view.peer_id
            with trio.move_on_after(self.ping_timeout):
                try:
                    conn = await self.pool.get(*parse_address(view.address), peer)
                    started = trio.current_time()  # the RTT of a call, not of the handshake
                    await call_info(conn, timeout=self.ping_timeout)
                except SwarmError:
                    return
                rtt = trio.current_time() - started
                old = self.pings.get(peer)
                self.pings[peer] = rtt if old is None else 0.8 * old + 0.2 * rtt
                if self.probe_hidden is not None:
                    await self._probe(conn, view, rtt)
            if self.direct is not None and view.relays and not self.pool.is_direct(peer):
                # our pushes to it go the direct way from now on, and so do the next pings
                relay_host = parse_address(view.address)[0]
                await self.pool.try_upgrade(peer, towards=relay_host, punch=self.direct)

        async with trio.open_nursery() as nursery:
            for view in targets:
                nursery.start_soon(ping, view)

    @property
    def delivered(self) -> dict[PeerId, float]:
        """Tokens per second each next server delivered: the best of its last `PROBES`
        probes (a busy machine only ever makes a probe slower, never faster than the
        server can compute, so the best one is the truest)."""
        return {peer: max(figures) for peer, figures in self._probes.items() if figures}

    async def _probe(self, conn: RpcConnection, view: ServerView, rtt: float) -> None:
        """Time a one-token ``forward`` through ``view``'s whole span: it delivered
        1 / (time - rtt) tokens per second. A failed probe measures nothing (a dead
        server's record expires on its own)."""
        assert self.probe_hidden is not None
        request = ForwardRequest(
            hidden_states=torch.zeros(1, 1, self.probe_hidden),  # (batch, seq, hidden)
            positions=torch.zeros(1, 1, dtype=torch.int64),  # (batch, seq)
            layer_range=view.layers,
        )
        started = trio.current_time()
        try:
            await call_forward(conn, request, timeout=self.ping_timeout)
        except SwarmError as exc:
            log.info("probing %s failed: %s", view.peer_id, exc)
            return
        seconds = max(trio.current_time() - started - rtt, _PROBE_FLOOR_S)
        figures = self._probes.setdefault(view.peer_id, deque(maxlen=PROBES))
        figures.append(min(1.0 / seconds, MAX_THROUGHPUT))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Re-announce every half TTL (refreshing pings first) until cancelled."""
        task_status.started()
        while True:
            await trio.sleep(self.ttl / 2)
            try:
                await self.measure_next_pings()
            except SwarmError as exc:
                log.info("measuring next-hop pings failed: %s", exc)
            await self.announce()
