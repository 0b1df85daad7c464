"""The DHT's UDP through emulated links: one-way delays add up per round trip, lost
datagrams are lost, and traffic is counted per node."""

from __future__ import annotations

import time

import trio

from swarm.dht import (
    DHTConfig,
    TimingConfig,
)
from swarm.testing.dht import open_dht_cluster
from swarm.testing.links import DatagramLinkEmulator, LinkSpec


async def _timed_get(cluster_node: object, key: str) -> tuple[int, float]:
    started = time.monotonic()
    found = await cluster_node.get(key)  # type: ignore[attr-defined]
    return len(found), time.monotonic() - started


async def test_regions_delay_lookups_by_their_round_trips() -> None:
    links = DatagramLinkEmulator()
    config = DHTConfig(timing=TimingConfig(rpc_timeout=2.0))
    with trio.fail_after(60):
        async with open_dht_cluster(4, config, seed="links", links=links) as cluster:
            await cluster.nodes[0].announce("k", {"v": 1}, 60.0)
            for i, node in enumerate(cluster.nodes):
                links.place(("127.0.0.1", node.port), "near" if i < 2 else "far")
            links.set_between("near", "near", LinkSpec(delay=0.0))
            links.set_between("far", "far", LinkSpec(delay=0.0))
            links.set_between("near", "far", LinkSpec(delay=0.1))
            found, far = await _timed_get(cluster.nodes[3], "k")
            assert found == 1
            assert far >= 0.2  # at least one round trip across: 2 x 100 ms one-way
            sent = sum(n for n, _ in links.sent.values())
            assert sent > 0 and all(b > 0 for _, b in links.sent.values())


async def test_a_node_whose_datagrams_are_all_lost_is_not_heard() -> None:
    links = DatagramLinkEmulator()
    config = DHTConfig(timing=TimingConfig(rpc_timeout=0.5))
    with trio.fail_after(60):
        async with open_dht_cluster(3, config, seed="lossy", links=links) as cluster:
            await cluster.nodes[1].announce("k", {"v": 1}, 60.0)
            mute = cluster.nodes[2]
            address = ("127.0.0.1", mute.port)
            for other in cluster.nodes[:2]:
                links.set(address, ("127.0.0.1", other.port), LinkSpec(loss=1.0))
            with trio.move_on_after(10):
                await mute.announce("m", {"v": 2}, 60.0)  # its stores never arrive
            assert links.lost > 0
            found, _ = await _timed_get(cluster.nodes[0], "m")
            assert found == 0  # nor its answers
            found, _ = await _timed_get(cluster.nodes[0], "k")
            assert found == 1  # the others still hear each other
