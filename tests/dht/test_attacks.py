"""The attacks of issue 14, each scripted against a swarm of in-process DHT nodes on loopback.

Every test here failed on the DHT as it was before the defences (see the commit that added
them): junk records evicted real ones, one address planted thousands of contacts, a ping
from a new id made a full node send thousands of stores to an unverified address, dead
client contacts slowed every later join, and three nodes replying "no records" ended lookups
with nothing.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from kademlia.node import Node

from swarm.dht import (
    AdmissionConfig,
    DHTConfig,
    DHTNode,
    KademliaConfig,
    StorageConfig,
    TimingConfig,
)
from swarm.dht.protocol import key_digest
from swarm.dht.records import make_record
from swarm.dht.sources import PrivateGroups
from swarm.dht.wire import encode_request
from swarm.identity import Identity
from swarm.testing.dht import DHTCluster, open_dht_cluster

# every node here plays its own host on one machine: group loopback endpoints apart
FAST = DHTConfig(
    timing=TimingConfig(rpc_timeout=0.5, bootstrap_timeout=5.0),
    admission=AdmissionConfig(private_groups=PrivateGroups.ENDPOINT),
)
BLOCKS = [f"victim-model/block/{i}" for i in range(4)]


async def _on_loop(node: DHTNode, fn: Callable[[Any], Awaitable[Any]]) -> Any:
    """Run ``fn(kademlia_node)`` (a coroutine function) on the DHT loop thread."""
    return await node._runner.run(lambda: fn(node._kad))


async def _node_of(node: DHTNode) -> Node:
    node_id = await node.run_on_loop(lambda kad: kad.node.id)
    return Node(node_id, "127.0.0.1", node.port)


async def _contacts(node: DHTNode) -> list[tuple[bytes, int]]:
    return await node.run_on_loop(  # type: ignore[no-any-return]
        lambda kad: [(n.id, n.port) for b in kad.protocol.router.buckets for n in b.get_nodes()]
    )


def _near(dkey: bytes, low_bits: int) -> bytes:
    """A random id that shares all but the lowest ``low_bits`` bits with ``dkey``."""
    noise = int.from_bytes(os.urandom(20), "big") & ((1 << low_bits) - 1)
    return (int.from_bytes(dkey, "big") ^ noise).to_bytes(20, "big")


async def test_forty_identities_flooding_every_block_key_leave_real_records_readable() -> None:
    with trio.fail_after(60):
        async with open_dht_cluster(10, FAST, seed="flood") as cluster:
            servers = cluster.nodes[1:6]
            for server in servers:
                for key in BLOCKS:
                    await server.announce(key, {"addr": server.address}, 60.0)
            config = DHTConfig(
                initial_peers=(cluster.nodes[0].address,),
                timing=TimingConfig(rpc_timeout=0.5),
                admission=AdmissionConfig(private_groups=PrivateGroups.ENDPOINT),
            )
            async with DHTNode.open(Identity.from_seed(b"flooder"), config) as attacker:
                forty = [Identity.from_seed(f"sybil-{i}".encode()) for i in range(40)]
                expires = (
                    time.time() + FAST.storage.max_ttl
                )  # the longest life storing nodes accept
                for target in cluster.nodes:
                    node = await _node_of(target)
                    for key in BLOCKS:
                        blobs = [
                            make_record(s, key, {"junk": i}, expires, 1, 1200).encoded
                            for i, s in enumerate(forty)
                        ]
                        await _on_loop(
                            attacker,
                            lambda kad, b=blobs, k=key, n=node: kad.protocol.store_records(
                                n, key_digest(k), b
                            ),
                        )
                late = cluster.nodes[6]  # a server that starts after the flood
                for server in [*servers, late]:  # servers re-announce every TTL/2
                    for key in BLOCKS:
                        await server.announce(key, {"addr": server.address}, 60.0)
                honest = {s.peer_id for s in [*servers, late]}
                for reader in (cluster.nodes[8], cluster.nodes[9]):
                    found = await reader.get_many(BLOCKS)
                    for key in BLOCKS:
                        assert honest <= set(found[key]), (key, len(honest - set(found[key])))


async def test_thousands_of_fresh_ids_from_one_address_get_one_contact() -> None:
    with trio.fail_after(90):
        async with open_dht_cluster(8, FAST, seed="poison") as cluster:
            writer = cluster.nodes[2]
            for key in BLOCKS:
                await writer.announce(key, {"addr": writer.address}, 60.0)
            config = DHTConfig(
                initial_peers=(cluster.nodes[0].address,), timing=TimingConfig(rpc_timeout=0.5)
            )
            async with DHTNode.open(Identity.from_seed(b"poisoner"), config) as attacker:
                targets = [("127.0.0.1", n.port) for n in cluster.nodes]

                async def flood(kad: Any) -> None:
                    # 4000 requests: 2000 fake ids next to the block keys, each pinging one
                    # node twice in a row (the second echoes what the first reply handed back)
                    for batch in range(40):
                        where = targets[batch % len(targets)]
                        ids = [_near(key_digest(BLOCKS[batch % 4]), 100) for _ in range(50)]
                        for _ in range(2):
                            await trio_free_gather(kad.protocol.ping(where, i) for i in ids)

                await _on_loop(attacker, flood)
                for node in cluster.nodes:
                    theirs = [c for c in await _contacts(node) if c[1] == attacker.port]
                    assert len(theirs) <= 1, f"{len(theirs)} of the attacker's ids are contacts"
                    found = await node.get_many(BLOCKS)
                    assert all(set(found[k]) == {writer.peer_id} for k in BLOCKS)


async def trio_free_gather(awaitables: Any) -> list[Any]:
    """asyncio.gather for the DHT loop thread (named so it is not mistaken for trio code)."""
    import asyncio

    return list(await asyncio.gather(*awaitables))


def _ping_datagram(node_id: bytes) -> bytes:
    """A ping request as it goes on the wire (from a full node: it could become a contact)."""
    return encode_request(os.urandom(20), "ping", (node_id,), client_only=False, token=None)


async def test_a_full_node_answers_a_new_id_quickly_and_sends_nothing_else() -> None:
    keys = 3000
    config = DHTConfig(timing=TimingConfig(rpc_timeout=0.5), storage=StorageConfig(max_keys=keys))
    async with DHTNode.open(Identity.from_seed(b"full"), config) as full:
        writer = Identity.from_seed(b"filler")
        expires = time.time() + 300

        def fill(kad: Any) -> int:
            for i in range(keys):
                key = f"filler/{i}"
                record = make_record(writer, key, {"i": i}, expires, 1, 1200)
                kad.storage.merge(key_digest(key), [record.encoded])
            return len(list(kad.storage))

        assert await full.run_on_loop(fill) == keys
        with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
            await sock.bind(("127.0.0.1", 0))
            received = 0
            for _ in range(5):  # five pings, each from a never-seen node id
                await sock.sendto(_ping_datagram(os.urandom(20)), ("127.0.0.1", full.port))
                with trio.fail_after(5):
                    await sock.recv(65536)
                received += 1
            with trio.move_on_after(1.0):  # anything else it sends us arrives by then
                while True:
                    await sock.recv(65536)
                    received += 1
        # answered without first handing its keys to the newcomer (what made replies slow)
        assert received == 5, f"{received - 5} datagrams beyond the replies"
        stats = full.statistics()
        assert stats.keys_stored == keys and stats.handoffs == 0 and stats.routing_table_size == 0


async def _join_announce_get(cluster: DHTCluster, seed: str) -> int:
    """Requests that timed out while a new full node joined, announced one record and read
    it back. The node stays in the cluster (a server that started)."""
    config = DHTConfig(
        initial_peers=(cluster.nodes[0].address,), timing=TimingConfig(rpc_timeout=0.5)
    )
    node = await cluster.add(Identity.from_seed(seed.encode()), config)
    await node.announce(BLOCKS[0], {"addr": node.address}, 30.0)
    assert node.peer_id in await node.get(BLOCKS[0])
    return node.statistics().rpc_timeouts


async def _join_timeouts(cluster: DHTCluster, seed: str) -> int:
    return sum([await _join_announce_get(cluster, f"{seed}{i}") for i in range(3)])


async def test_two_hundred_clients_coming_and_going_do_not_slow_joins() -> None:
    client = DHTConfig(
        client_only=True, timing=TimingConfig(rpc_timeout=0.5, bootstrap_timeout=5.0)
    )
    with trio.fail_after(240):
        async with open_dht_cluster(10, FAST, seed="churn") as cluster:
            for server in cluster.nodes[1:4]:
                await server.announce(BLOCKS[1], {"addr": server.address}, 120.0)
            assert await _join_timeouts(cluster, "first") == 0
            for i in range(200):
                peers = (cluster.nodes[i % 10].address,)
                config = dataclasses.replace(client, initial_peers=peers)
                async with DHTNode.open(Identity.from_seed(f"client{i}".encode()), config) as c:
                    assert len(await c.get(BLOCKS[1])) == 3
            # what slowed joins: asking dead contacts; the clients left none behind
            assert await _join_timeouts(cluster, "after") == 0
            for node in cluster.nodes:
                assert len(await node.routing_addresses()) <= 9 + 6  # servers, joiners


async def test_three_nodes_replying_with_no_records_do_not_end_a_lookup() -> None:
    config = DHTConfig(
        kademlia=KademliaConfig(ksize=4),
        timing=TimingConfig(rpc_timeout=0.5, bootstrap_timeout=5.0),
    )
    key = BLOCKS[2]
    dkey = key_digest(key)
    with trio.fail_after(60):
        async with open_dht_cluster(12, config, seed="empty") as cluster:
            writer = cluster.nodes[3]
            await writer.announce(key, {"addr": writer.address}, 60.0)
            holders = [
                n for n in cluster.nodes if await n.run_on_loop(lambda kad: kad.storage.get(dkey))
            ]
            reader = next(n for n in cluster.nodes if n not in holders)
            fakes = []
            for i in range(3):
                peer = (cluster.nodes[0].address,)
                fake = await cluster.add(
                    Identity.from_seed(f"fake{i}".encode()),
                    dataclasses.replace(config, initial_peers=peer),
                )

                def lie(kad: Any, bit: int = i) -> None:
                    new_id = _flip(dkey, bit + 1)
                    kad.node.id, kad.node.long_id = new_id, int(new_id.hex(), 16)
                    kad.protocol.rpc_find_value = lambda *args: {"value": []}

                await fake.run_on_loop(lie)
                fakes.append(await _node_of(fake))
            for fake_node in fakes:  # the reader hears from them: they are its closest contacts

                async def ping(kad: Any, n: Node = fake_node) -> Any:
                    return await kad.protocol.call_ping(n)

                assert (await _on_loop(reader, ping))[0]
            assert set(await reader.get(key)) == {writer.peer_id}


def _flip(dkey: bytes, bit: int) -> bytes:
    return (int.from_bytes(dkey, "big") ^ (1 << bit)).to_bytes(20, "big")


async def test_many_nodes_behind_one_ip_hold_a_few_places_in_any_table() -> None:
    """With the per-IP caps applied to loopback: honest nodes each on their own /24, twenty
    real nodes of one attacker on one IP (many ports)."""
    config = DHTConfig(
        timing=TimingConfig(rpc_timeout=0.5, bootstrap_timeout=5.0),
        admission=AdmissionConfig(cap_private_addresses=True),
    )
    cluster = DHTCluster()
    try:
        with trio.fail_after(60):
            for i in range(8):
                peers = (cluster.nodes[0].address,) if cluster.nodes else ()
                host_config = dataclasses.replace(config, host=f"127.0.{i + 1}.1")
                host_config = dataclasses.replace(host_config, initial_peers=peers)
                await cluster.add(Identity.from_seed(f"honest{i}".encode()), host_config)
            writer = cluster.nodes[3]
            for key in BLOCKS:
                await writer.announce(key, {"addr": writer.address}, 60.0)
            entry = (cluster.nodes[0].address, cluster.nodes[5].address)
            for i in range(20):
                sybil = dataclasses.replace(config, host="127.66.0.1")
                sybil = dataclasses.replace(sybil, initial_peers=(entry[i % 2],))
                node = await cluster.add(Identity.from_seed(f"sybil{i}".encode()), sybil)
                await node.get(BLOCKS[i % 4])  # and they keep talking
            for node in cluster.nodes[:8]:
                hosts = [ip for ip, _ in await node.routing_addresses()]
                assert hosts.count("127.66.0.1") <= config.admission.max_contacts_per_ip, hosts
                found = await node.get_many(BLOCKS)
                assert all(set(found[k]) == {writer.peer_id} for k in BLOCKS)
            assert sum(n.statistics().contacts_refused for n in cluster.nodes[:8]) > 0
    finally:
        await cluster.aclose()


async def test_client_only_nodes_ask_and_store_but_nobody_adds_them() -> None:
    with trio.fail_after(30):
        async with open_dht_cluster(6, FAST, seed="clients") as cluster:
            config = DHTConfig(
                initial_peers=(cluster.nodes[0].address,),
                client_only=True,
                timing=TimingConfig(rpc_timeout=0.5),
            )
            async with DHTNode.open(Identity.from_seed(b"a-client"), config) as client:
                assert await client.announce(BLOCKS[0], {"evidence": 1}, 30.0) > 0
                await cluster.nodes[2].announce(BLOCKS[0], {"addr": "x"}, 30.0)
                expected = {client.peer_id, cluster.nodes[2].peer_id}
                assert set(await client.get(BLOCKS[0])) == expected
                assert set(await cluster.nodes[5].get(BLOCKS[0])) == expected
                assert len(await client.routing_addresses()) > 0  # it has contacts itself
                for node in cluster.nodes:
                    assert client.port not in {p for _, p in await node.routing_addresses()}
                assert client.statistics().keys_stored == 0  # and holds nothing for others


async def test_contacts_that_stop_answering_leave_without_any_lookup() -> None:
    config = DHTConfig(
        timing=TimingConfig(rpc_timeout=0.3, bootstrap_timeout=5.0, contact_check_interval=0.3)
    )
    with trio.fail_after(30):
        async with open_dht_cluster(6, config, seed="leavers") as cluster:
            gone = cluster.nodes[3].port
            await cluster.stop(3)
            for node in cluster.live:
                while gone in {p for _, p in await node.routing_addresses()}:
                    await trio.sleep(0.05)
            assert sum(n.statistics().contacts_evicted for n in cluster.live) >= 1


async def test_joining_needs_the_initial_peers_not_a_finished_crawl() -> None:
    slow = DHTConfig(timing=TimingConfig(rpc_timeout=3.0, bootstrap_timeout=5.0))
    with trio.fail_after(30):
        async with open_dht_cluster(8, slow, seed="slowcrawl") as cluster:
            for index in range(2, 8):  # dead, but still in node 0's table
                await cluster.stop(index)
            config = DHTConfig(
                initial_peers=(cluster.nodes[0].address,),
                timing=TimingConfig(rpc_timeout=3.0, bootstrap_timeout=1.0, join_crawl_timeout=0.5),
            )
            async with DHTNode.open(Identity.from_seed(b"joiner"), config) as node:
                # ready before any request to the dead (3 s each) could time out
                assert node.statistics().rpc_timeouts == 0
                assert ("127.0.0.1", cluster.nodes[0].port) in await node.routing_addresses()
