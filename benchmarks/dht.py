"""DHT benchmark: bootstrap time, announce/get latency and recall vs swarm size, on loopback;
and the time a new server takes to start after N short-lived clients came and went.

    python benchmarks/dht.py [--sizes 30 100 300] [--gets 200] [--rpc-timeout 2.0]
                             [--churn 0 8 200] [--churn-servers 30]

All nodes run in this process on one shared DHT loop thread. For each size: open N nodes
(each joins through node 0), let W = max(10, N/10) writers announce 12 keys each, time `get`
from random nodes; then stop a random third of the nodes (writers included; their records
stay until expiry, so every writer's record is still expected) and time `get` again from the
survivors. Recall = records returned / records expected. Beside each latency: the datagrams
received by all nodes (requests and replies: the work the swarm did) and the CPU time of this
process, per node joined / per announce / per get, figures that a loaded machine disturbs
far less than latencies.

Churn: for each N, a fresh swarm of ``--churn-servers`` full nodes (10 of them announce the 12
keys); N clients join one after another through a random server (``client_only``, as
``generate`` / ``status`` should), read one key and leave; then three new servers, one after
another, join and announce all 12 keys concurrently (what a starting server does), and 100
gets are timed from random servers.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import time

import trio

from swarm.dht import DHTConfig, DHTNode, TimingConfig
from swarm.dht.protocol import SwarmProtocol
from swarm.identity import Identity
from swarm.testing.dht import DHTCluster, open_dht_cluster
from swarm.types import PeerId

replace = dataclasses.replace

KEYS = [f"bench-model/block/{i}" for i in range(12)]


class _Work:
    """Datagrams received by every DHT node of this process, and this process's CPU time."""

    datagrams = 0

    @classmethod
    def install(cls) -> None:
        received = SwarmProtocol.datagram_received

        def counted(self: SwarmProtocol, data: bytes, addr: object) -> None:
            cls.datagrams += 1
            received(self, data, addr)

        SwarmProtocol.datagram_received = counted  # type: ignore[method-assign]

    @classmethod
    def mark(cls) -> tuple[int, float]:
        return cls.datagrams, time.process_time()

    @classmethod
    def since(cls, mark: tuple[int, float], count: int) -> str:
        datagrams, cpu = cls.datagrams - mark[0], time.process_time() - mark[1]
        return f"[{datagrams / count:6.1f} datagrams, {cpu / count * 1e3:5.2f} ms CPU each]"


def _summary(samples: list[float]) -> str:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return f"median {statistics.median(ordered) * 1e3:7.2f} ms  p95 {p95 * 1e3:7.2f} ms"


async def _gets(
    cluster: DHTCluster, writers: set[PeerId], count: int
) -> tuple[list[float], float, str]:
    rng = random.Random(1)
    live = cluster.live
    latencies, found, expected = [], 0, 0
    mark = _Work.mark()
    for _ in range(count):
        reader, key = rng.choice(live), rng.choice(KEYS)
        start = time.perf_counter()
        records = await reader.get(key)
        latencies.append(time.perf_counter() - start)
        found += len(writers & set(records))
        expected += len(writers)
    return latencies, found / expected, _Work.since(mark, count)


async def bench(size: int, gets: int, config: DHTConfig) -> None:
    start, mark = time.perf_counter(), _Work.mark()
    async with open_dht_cluster(size, config, seed=f"bench{size}") as cluster:
        boot, boot_work = time.perf_counter() - start, _Work.since(mark, size)
        writers = cluster.nodes[: max(10, size // 10)]
        announce, mark = [], _Work.mark()
        for w in writers:
            for key in KEYS:
                t = time.perf_counter()
                await w.announce(key, {"addr": w.address, "layers": [0, 8]}, 300.0)
                announce.append(time.perf_counter() - t)
        announce_work = _Work.since(mark, len(announce))
        ids = {w.peer_id for w in writers}
        latencies, recall, work = await _gets(cluster, ids, gets)
        print(
            f"N={size:4d} bootstrap {boot / size * 1e3:6.2f} ms/node ({boot:.1f} s total)"
            f"  {boot_work}"
        )
        print(f"       announce {_summary(announce)}  ({len(announce)} announces)  {announce_work}")
        print(f"       get      {_summary(latencies)}  recall {recall:.2%}  ({gets} gets)  {work}")
        for index in random.Random(2).sample(range(1, size), size // 3):
            await cluster.stop(index)
        latencies, recall, work = await _gets(cluster, ids, gets)
        print(f"       get, a third stopped: {_summary(latencies)}  recall {recall:.2%}  {work}")
        latencies, recall, work = await _gets(cluster, ids, gets)
        print(
            f"       again (dead contacts evicted): {_summary(latencies)}  recall {recall:.2%}"
            f"  {work}"
        )


async def _start_server(cluster: DHTCluster, config: DHTConfig, name: str) -> tuple[float, float]:
    """(join seconds, join + announce seconds) of a new full node that stays in the swarm."""
    peers = (cluster.nodes[0].address,)
    started = time.perf_counter()
    node = await cluster.add(
        Identity.from_seed(name.encode()), replace(config, initial_peers=peers)
    )
    joined = time.perf_counter() - started
    async with trio.open_nursery() as nursery:
        for key in KEYS:
            nursery.start_soon(node.announce, key, {"addr": node.address, "layers": [0, 8]}, 60.0)
    return joined, time.perf_counter() - started


async def churn(clients: int, servers: int, config: DHTConfig) -> None:
    async with open_dht_cluster(servers, config, seed=f"churn{clients}") as cluster:
        writers = cluster.nodes[:10]
        for w in writers:
            for key in KEYS:
                await w.announce(key, {"addr": w.address, "layers": [0, 8]}, 300.0)
        rng = random.Random(3)
        client_config = replace(config, client_only=True)
        started = time.perf_counter()
        for i in range(clients):
            peers = (rng.choice(cluster.nodes).address,)
            cfg = replace(client_config, initial_peers=peers)
            async with DHTNode.open(Identity.from_seed(f"client{i}".encode()), cfg) as client:
                await client.get(rng.choice(KEYS))
        churn_s = time.perf_counter() - started
        mark = _Work.mark()
        starts = [await _start_server(cluster, config, f"late{clients}-{i}") for i in range(3)]
        start_work = _Work.since(mark, 3)
        latencies, recall, _ = await _gets(cluster, {w.peer_id for w in writers}, 100)
        joined = statistics.median(j for j, _ in starts)
        announced = statistics.median(a for _, a in starts)
        print(
            f"churn N={clients:3d} ({churn_s:5.1f} s for the clients): new server joins in "
            f"{joined * 1e3:7.1f} ms, joins+announces 12 keys in {announced * 1e3:7.1f} ms "
            f"(median of 3) {start_work}; get {_summary(latencies)}  recall {recall:.2%}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[30, 100, 300])
    parser.add_argument("--gets", type=int, default=200)
    parser.add_argument("--rpc-timeout", type=float, default=DHTConfig().timing.rpc_timeout)
    parser.add_argument("--churn", type=int, nargs="*", default=[0, 8, 200])
    parser.add_argument("--churn-servers", type=int, default=30)
    args = parser.parse_args()
    _Work.install()
    config = DHTConfig(timing=TimingConfig(rpc_timeout=args.rpc_timeout))
    print(
        f"DHTConfig: rpc_timeout {config.timing.rpc_timeout} s, k={config.kademlia.ksize}, "
        f"alpha={config.kademlia.alpha}, get_quorum={config.kademlia.get_quorum}"
    )
    for size in args.sizes:
        trio.run(bench, size, args.gets, config)
    for clients in args.churn:
        trio.run(churn, clients, args.churn_servers, config)


if __name__ == "__main__":
    main()
