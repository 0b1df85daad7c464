"""Lookups keep the provenance of contacts (`swarm.dht.crawling`): a replier whose contacts
point at nothing is distrusted for the rest of the lookup, and one address holds one id.
Pure logic on the lookup's heap: no sockets, no clock."""

from __future__ import annotations

import asyncio
import os

from kademlia.node import Node

from swarm.dht.crawling import DISTRUST_AFTER, MIN_STALL, NodeCrawl


def _close_to(target: bytes, low_bits: int = 16) -> bytes:
    noise = int.from_bytes(os.urandom(4), "big") & ((1 << low_bits) - 1)
    return (int.from_bytes(target, "big") ^ noise).to_bytes(20, "big")


class _ScriptedPeers:
    """A lookup's protocol without a network: each peer answers ``find_node`` after its
    ``delays`` entry (0.01 s otherwise) with the contacts ``names`` gives it, or, if
    ``silent``, times out after ``rpc_timeout``; when each was asked and answered is kept."""

    def __init__(
        self,
        delays: dict[bytes, float] | None = None,
        names: dict[bytes, list[Node]] | None = None,
        silent: set[bytes] | None = None,
        rpc_timeout: float = 0.0,
    ) -> None:
        self.delays, self.names = delays or {}, names or {}
        self.silent, self.rpc_timeout = silent or set(), rpc_timeout
        self.asked: dict[bytes, float] = {}
        self.answered: dict[bytes, float] = {}

    def spawn(self, coro: object) -> asyncio.Future[object]:
        return asyncio.ensure_future(coro)  # type: ignore[arg-type]

    async def call_find_node(self, peer: Node, node: Node) -> tuple[bool, object]:
        loop = asyncio.get_running_loop()
        self.asked[peer.id] = loop.time()
        if peer.id in self.silent:
            await asyncio.sleep(self.rpc_timeout)
            self.answered[peer.id] = loop.time()
            return False, None
        await asyncio.sleep(self.delays.get(peer.id, 0.01))
        self.answered[peer.id] = loop.time()
        return True, [[n.id, n.ip, n.port] for n in self.names.get(peer.id, [])]

    def find_nodes(self, target: Node, peers: list[Node], alpha: int) -> list[Node]:
        async def lookup() -> list[Node]:
            return await NodeCrawl(self, target, peers, 20, alpha).find()  # type: ignore[no-any-return]

        return asyncio.run(lookup())


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


def test_a_round_whose_contacts_all_stay_silent_does_not_stall_the_lookup() -> None:
    # the three closest contacts left the network (or a liar made them up): they answer
    # nothing until the RPC timeout. The lookup asks the next contacts once they stalled,
    # long before that timeout, and still waits the silent ones out at its end.
    target = Node(os.urandom(20))
    silent = [Node(_close_to(target.id, 8), "127.0.0.1", 10 + i) for i in range(3)]
    live = [Node(_close_to(target.id, 60), "127.0.0.1", 20 + i) for i in range(3)]
    peers = _ScriptedPeers(silent={n.id for n in silent}, rpc_timeout=MIN_STALL * 3)
    found = peers.find_nodes(target, silent + live, 3)
    assert {n.id for n in found} == {n.id for n in live}  # the silent ones were evicted
    first_silent_timeout = min(peers.answered[n.id] for n in silent)
    assert all(peers.asked[n.id] < first_silent_timeout for n in live)
    last = max(peers.answered.values())
    assert last == max(peers.answered[n.id] for n in silent)  # waited out at the end


def test_a_record_lookup_reads_on_until_a_replica_adds_no_announcer() -> None:
    # the first three replicas each hold a different part of the key's records (a record
    # that reached only some of the k closest); the fourth holds one none of them had. A
    # lookup that stopped at the first three replicas missed it; it stops once a replica
    # adds nothing, and a junk reply never counts as a replica.
    import time

    from swarm.dht.crawling import RecordCrawl
    from swarm.dht.records import DropReason, Record, check_record, make_record
    from swarm.identity import Identity

    key = "model/block/0"
    signers = {name: Identity.from_seed(name.encode()) for name in "ABCD"}
    blob = {
        name: make_record(ident, key, {"n": name}, time.time() + 60, 1, 4096).encoded
        for name, ident in signers.items()
    }

    def check(b: bytes) -> Record | DropReason:
        return check_record(b, key, now=time.time(), max_bytes=4096, max_ttl=3600, clock_skew=30)

    target = Node(os.urandom(20))
    replicas = [Node(os.urandom(20), "127.0.0.1", 10 + i) for i in range(6)]
    crawl = RecordCrawl(None, target, replicas, 20, 3, 3, check)  # type: ignore[arg-type]
    holds = [["A"], ["A", "B"], ["C"], ["D", "A"], ["A", "C"]]

    async def reply(i: int) -> list[bytes] | None:  # None: the lookup asks on
        return await crawl._nodes_found(
            {replicas[i].id: (True, {"value": [blob[n] for n in holds[i]]})}
        )

    async def read() -> list[bytes]:
        for i in range(3):
            assert await reply(i) is None  # each added an announcer: read on
        junk = {replicas[5].id: (True, {"value": [os.urandom(40)]})}
        assert await crawl._nodes_found(junk) is None  # not a replica
        assert await reply(3) is None  # D is new
        found = await reply(4)  # nothing new: done
        assert found is not None
        return found

    found = asyncio.run(read())
    assert crawl.replicas == 5
    records = [check(b) for b in found]
    assert {r.value["n"] for r in records if isinstance(r, Record) and r.value} == set("ABCD")


def test_a_reply_is_used_as_it_comes_not_after_the_slowest_of_its_round() -> None:
    # one contact answers at 0.2 s naming a closer one; another is slow (0.9 s). The closer
    # contact is asked as soon as the first reply came, long before the slow one answers
    # (rounds asked it only once the round's grace, 4x the first reply, was over: at 1 s)
    target = Node(os.urandom(20))
    fast = Node(_close_to(target.id, 100), "127.0.0.1", 10)
    slow = Node(_close_to(target.id, 101), "127.0.0.1", 11)
    closer = Node(_close_to(target.id, 8), "127.0.0.1", 12)
    peers = _ScriptedPeers(delays={fast.id: 0.2, slow.id: 0.9}, names={fast.id: [closer]})
    found = peers.find_nodes(target, [fast, slow], 2)
    assert closer.id in {n.id for n in found}
    assert peers.asked[closer.id] < peers.answered[slow.id]
