"""Telling the swarm about this server: DHT announcements and next-hop pings.

A server announces one record per block it serves, under `swarm.directory.block_key`, with
a TTL of `ServerConfig.announce_ttl`, and re-announces every half TTL, so a server that
dies vanishes from the DHT within one TTL. Each record carries the round-trip times to up
to `MAX_PINGS` servers of the block right after our range, which the client's route
planner uses as the cost of the server-to-server link.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from swarm.dht import DHTNode
from swarm.directory import (
    ServerView,
    announce_model_id,
    block_key,
    block_keys,
    servers_from_records,
)
from swarm.errors import SwarmError
from swarm.net.messages import PingEntry, ServerAnnouncement
from swarm.net.pool import ConnectionPool
from swarm.net.punch import PunchConfig
from swarm.net.surface import call_info
from swarm.server.balance import delivered_throughput
from swarm.types import LayerRange, PeerId, ServerState, parse_address

__all__ = [
    "MAX_PINGS",
    "Announcer",
    "choose_layers",
]

log = logging.getLogger(__name__)

MAX_PINGS = 5


async def choose_layers(
    dht: DHTNode, model_id: str, num_layers: int, num_blocks: int
) -> LayerRange:
    """The window of `num_blocks` consecutive blocks with the least announced throughput
    (online and joining servers count, relayed ones at their share:
    `swarm.server.balance.delivered_throughput`; ties go to the earliest window).
    Announcements are read with `swarm.directory.servers_from_records`, as clients read
    them."""
    found = await dht.get_many(block_keys(model_id, num_layers))
    per_block = [0.0] * num_layers
    for view in servers_from_records(found, model_id, num_layers):
        if view.state != ServerState.DRAINING:
            for block in view.layers:
                per_block[block] += delivered_throughput(view)
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
    ) -> None:
        self.dht = dht
        self.direct = direct  # try direct connections to relayed next servers (pushes)
        self.pool = pool
        self.model_id = model_id
        self.layers = layers
        self.num_layers = num_layers
        self.ttl = ttl
        self.ping_timeout = ping_timeout
        self._make = make_announcement
        self.pings: dict[PeerId, float] = {}
        self.announces = 0

    def move_to(self, layers: LayerRange) -> None:
        """Announce under ``layers``' block keys from now on (pings to the old next hop go)."""
        self.layers = layers
        self.pings.clear()

    async def announce(self) -> None:
        """Publish the current record under every block key we serve (concurrently)."""
        pings = tuple(PingEntry(peer, rtt) for peer, rtt in list(self.pings.items())[:MAX_PINGS])
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
            if self.direct is not None and view.relays and not self.pool.is_direct(peer):
                # our pushes to it go the direct way from now on, and so do the next pings
                relay_host = parse_address(view.address)[0]
                await self.pool.try_upgrade(peer, towards=relay_host, punch=self.direct)

        async with trio.open_nursery() as nursery:
            for view in targets:
                nursery.start_soon(ping, view)

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
