"""Lookups keep the provenance of contacts (`swarm.dht.crawling`): a replier whose contacts
point at nothing is distrusted for the rest of the lookup, and one address holds one id; a
node lookup does not wait out a contact that never answers. Pure logic on the lookup's heap
and a fake protocol: no sockets."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any

from kademlia.node import Node

from swarm.dht.crawling import DISTRUST_AFTER, NodeCrawl


def _close_to(target: bytes, low_bits: int = 16) -> bytes:
    noise = int.from_bytes(os.urandom(4), "big") & ((1 << low_bits) - 1)
    return (int.from_bytes(target, "big") ^ noise).to_bytes(20, "big")


def test_a_replier_whose_contacts_are_dead_is_distrusted_and_its_contacts_dropped() -> None:
    target = Node(os.urandom(20))
    honest = Node(os.urandom(20), "127.0.0.1", 1)
    liar = Node(os.urandom(20), "127.0.0.1", 2)
    crawl = NodeCrawl(None, target, [honest], 20, 3)
    crawl.nearest.mark_contacted(honest)
    crawl._learn(honest.id, [liar])
    crawl.nearest.mark_contacted(liar)
    junk = [Node(_close_to(target.id), "127.0.0.1", 100 + i) for i in range(20)]
    at_itself = [Node(_close_to(target.id), "127.0.0.1", 2) for _ in range(5)]
    crawl._learn(liar.id, junk + at_itself)
    held = {n.id for _, n in crawl.nearest.heap}
    assert not held & {n.id for n in at_itself}  # its own address already holds its id
    assert {n.id for n in junk} <= held
    tried = junk[:DISTRUST_AFTER]
    for node in tried:
        crawl.nearest.mark_contacted(node)
    crawl._forget([n.id for n in tried])
    held = {n.id for _, n in crawl.nearest.heap}
    assert held == {honest.id}  # the liar and every contact it gave are gone
    crawl._learn(liar.id, [Node(_close_to(target.id), "127.0.0.1", 300)])  # ignored now
    assert {n.id for _, n in crawl.nearest.heap} == {honest.id}


def test_an_honest_replier_with_one_dead_contact_keeps_its_others() -> None:
    target = Node(os.urandom(20))
    honest = Node(os.urandom(20), "127.0.0.1", 1)
    crawl = NodeCrawl(None, target, [honest], 20, 3)
    crawl.nearest.mark_contacted(honest)
    contacts = [Node(os.urandom(20), "127.0.0.1", 10 + i) for i in range(4)]
    crawl._learn(honest.id, contacts)
    for node in contacts[:3]:
        crawl.nearest.mark_contacted(node)
    crawl._learn(contacts[1].id, [])  # two of them answered
    crawl._learn(contacts[2].id, [])
    crawl._forget([contacts[0].id])  # one left the network
    crawl._forget([os.urandom(20)])  # and an id nobody gave us
    held = {n.id for _, n in crawl.nearest.heap}
    assert held == {honest.id} | {n.id for n in contacts[1:]}


class _Replies:
    """A protocol whose find_node requests answer at once with no contacts, except those to
    ``silent`` nodes, which answer nothing until ``rpc_timeout`` (a node that left)."""

    def __init__(self, silent: set[bytes], rpc_timeout: float) -> None:
        self.silent = silent
        self.rpc_timeout = rpc_timeout
        self.unanswered: list[asyncio.Future[object]] = []

    def spawn(self, coro: Coroutine[Any, Any, object]) -> asyncio.Future[object]:
        task = asyncio.ensure_future(coro)
        return task

    async def call_find_node(self, peer: Node, target: Node) -> tuple[bool, object]:
        if peer.id in self.silent:
            await asyncio.sleep(self.rpc_timeout)
            return False, None
        await asyncio.sleep(0.01)
        return True, []


def test_a_node_lookup_does_not_wait_out_a_contact_that_left() -> None:
    # where to store a record: among the k closest nodes of a key one has nearly always left
    # (or is a sybil that never answers); the lookup ends on the answers it has, well inside
    # that contact's RPC timeout, and still lists it (a store to it costs one datagram)
    async def lookup() -> tuple[list[Node], bool, float]:
        target = Node(os.urandom(20))
        peers = [Node(os.urandom(20), "127.0.0.1", 10 + i) for i in range(6)]
        protocol = _Replies({peers[0].id}, rpc_timeout=30.0)
        crawl = NodeCrawl(protocol, target, peers, 20, 3)
        found = await asyncio.wait_for(crawl.find(), timeout=60)
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        return found, bool(pending), crawl.slowest_reply

    found, silent_still_waiting, slowest = asyncio.run(lookup())
    assert silent_still_waiting  # it ended before the silent contact's timeout
    assert len(found) == 6 and 0 < slowest < 30
