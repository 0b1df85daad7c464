"""Lookups keep the provenance of contacts (`swarm.dht.crawling`): a replier whose contacts
point at nothing is distrusted for the rest of the lookup, and one address holds one id.
Pure logic on the lookup's heap: no sockets, no clock."""

from __future__ import annotations

import os

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
