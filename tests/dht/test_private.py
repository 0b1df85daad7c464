"""A private swarm: outsiders without the swarm key can neither read nor write, nor join."""

from __future__ import annotations

import time
from typing import Any

import pytest
import trio
from kademlia.node import Node

from swarm.dht import (
    DHTConfig,
    DHTNode,
    TimingConfig,
)
from swarm.dht.protocol import key_digest
from swarm.dht.records import make_record
from swarm.errors import DHTError
from swarm.identity import Identity
from swarm.testing.dht import open_dht_cluster

KEY = b"s" * 32
MEMBER = DHTConfig(swarm_key=KEY, timing=TimingConfig(rpc_timeout=0.3, bootstrap_timeout=2.0))


async def test_outsider_learns_nothing_and_stores_nothing() -> None:
    with trio.fail_after(30):
        async with open_dht_cluster(5, MEMBER) as cluster:
            for node in cluster.nodes:
                await node.announce("secret/block/0", {"addr": node.address}, 30.0)
            assert len(await cluster.nodes[4].get("secret/block/0")) == 5
            member = cluster.nodes[2]
            # cannot join, with no key or with another key
            for key in (None, b"o" * 32):
                config = DHTConfig(
                    swarm_key=key,
                    initial_peers=(member.address,),
                    timing=TimingConfig(rpc_timeout=0.3, bootstrap_timeout=1.0),
                )
                with pytest.raises(DHTError, match="none of the initial DHT peers"):
                    async with DHTNode.open(Identity.from_seed(b"outsider"), config):
                        pass
            outsider_id = Identity.from_seed(b"outsider")
            async with DHTNode.open(
                outsider_id, DHTConfig(timing=TimingConfig(rpc_timeout=0.3))
            ) as outsider:
                dkey = key_digest("secret/block/0")
                blob = make_record(outsider_id, "secret/block/0", {}, time.time() + 30, 1, 1200)
                member_id = await member.run_on_loop(lambda kad: kad.node.id)

                async def probe(kad: Any) -> list[Any]:
                    target = Node(member_id, "127.0.0.1", member.port)
                    proto = kad.protocol
                    return [
                        await proto.call_find_value(target, Node(dkey)),
                        await proto.call_find_node(target, Node(dkey)),
                        await proto.call_store(target, dkey, [blob.encoded]),
                    ]

                replies = await outsider._runner.run(lambda: probe(outsider._kad))
                assert [r[:2] for r in replies] == [(False, None)] * 3
                assert await outsider.get("secret/block/0") == {}
            held = await member.run_on_loop(lambda kad: kad.storage.records(dkey))
            assert outsider_id.peer_id not in {r.peer_id for r in held}
            assert len(held) == 5
            for node in cluster.nodes:
                addresses = await node.routing_addresses()
                assert all(port in {n.port for n in cluster.nodes} for _, port in addresses)
            assert member.statistics().datagrams_rejected >= 3
