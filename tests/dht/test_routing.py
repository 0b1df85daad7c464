"""`ContactTable`'s bucket search and neighbours give stock kademlia's answers, faster."""

from __future__ import annotations

import random
from typing import Any

from kademlia.node import Node
from kademlia.routing import RoutingTable

from swarm.dht import DHTConfig
from swarm.dht.routing import ContactTable
from swarm.dht.sources import SourceGroups


class _Protocol:
    async def call_ping(self, node: Node) -> None:
        return None


def _tables(rng: random.Random, contacts: int) -> tuple[ContactTable, RoutingTable]:
    me = Node(rng.randbytes(20))
    spawned: list[Any] = []

    def spawn(coro: Any) -> None:
        coro.close()  # a full bucket's head ping: not sent here
        spawned.append(coro)

    ours = ContactTable(_Protocol(), DHTConfig(), me, SourceGroups(False), spawn)
    for i in range(contacts):
        ours.add_contact(Node(rng.randbytes(20), f"10.{i % 200}.{i // 200}.1", 4000 + i))
    stock = RoutingTable(_Protocol(), ours.ksize, me)
    stock.buckets = ours.buckets  # the same buckets, searched the stock way
    return ours, stock


def test_bucket_search_and_neighbours_are_stocks() -> None:
    rng = random.Random(7)
    for contacts in (0, 5, 60, 400):
        ours, stock = _tables(rng, contacts)
        held = ours.contacts()
        assert len(ours.buckets) > (1 if contacts >= 60 else 0)
        for _ in range(200):
            target = Node(rng.randbytes(20)) if rng.random() < 0.7 or not held else rng.choice(held)
            assert ours.get_bucket_for(target) == RoutingTable.get_bucket_for(stock, target)
            k = rng.choice((None, 1, 3, 20, 50))
            exclude = rng.choice(held) if held and rng.random() < 0.5 else None
            got = ours.find_neighbors(target, k=k, exclude=exclude)
            want = RoutingTable.find_neighbors(stock, target, k=k, exclude=exclude)
            assert [n.id for n in got] == [n.id for n in want]


def test_bucket_bounds_follow_splits() -> None:
    rng = random.Random(3)
    ours, stock = _tables(rng, 30)
    before = len(ours.buckets)
    probe = Node(rng.randbytes(20))
    ours.get_bucket_for(probe)  # bounds cached
    for i in range(300):
        ours.add_contact(Node(rng.randbytes(20), f"10.9.{i % 250}.{i // 250 + 2}", 9000 + i))
    assert len(ours.buckets) > before
    for node in ours.contacts():
        index = ours.get_bucket_for(node)
        assert index == RoutingTable.get_bucket_for(stock, node)
        assert index is not None and node.id in ours.buckets[index].nodes
