"""Lookups that merge instead of voting, and that never trust a peer's reply shape.

Stock ``ValueSpiderCrawl`` stops at the first round that finds a value and returns the most
common value among that round's replies (a dict value crashes it: unhashable); its node lists
are turned into ``Node`` objects without checks. `RecordCrawl` keeps asking until
``quorum`` nodes returned valid records and the last of them held no announcer the others
lacked (or every one of the k closest was asked), and returns all the record blobs it saw,
for the reader to merge by subkey. A reply with no records, or with none that checks out, is
not a replica: a few nodes answering "nothing here" (or junk) cannot end a lookup with
nothing. Replicas that disagree (a record that reached only some of the k closest, a node
that joined since) keep the lookup reading until one more adds nothing: stopping at the
first ``quorum`` replicas whatever they held missed records that the next replica had.

Stock crawls go in rounds: ask alpha contacts, wait for the slowest of them, ask the next
alpha; one dead contact stalls a round for a whole RPC timeout, and every reply waits for
the slowest of its round. Ours keep alpha queries in flight instead: as soon as replies
come in (gathered for at most `MIN_GRACE` s after the first), they are used and new
queries go out to the closest contacts not yet asked, as many as keep alpha in flight. A
query that has not answered after `STALL_FACTOR` × the slowest reply of the lookup so far
(at least `MIN_STALL` s) stops counting toward alpha (another contact is asked beside it),
so contacts that left, or that a liar made up, cost the lookup `MIN_STALL`, not an RPC
timeout. A query that stalled stays in flight: its reply is used if it comes, and before
concluding that everyone was asked the lookup waits for the queries left, so moving on
never loses records; their timeouts still evict dead contacts. In the 1,000-node
simulation a round waited ~1 s at the median (the first reply from across regions at
~200 ms, then up to 4× that for a silent one) while the links' round trips are 10-240 ms.

Both crawls also keep the provenance of each contact they learned (`_Provenance`), because a
liar's reply can otherwise steer a lookup for ever: twenty made-up ids closer to the key than
any real node, at addresses where nothing answers (or all at the liar's own address), then
twenty more from the next liar, each round waiting out an RPC timeout. A contact at an address
the lookup already holds under another id is dropped (an address hosts one node); once
`DISTRUST_AFTER` of a replier's contacts failed to answer, and more failed than answered, the
replier is distrusted for the rest of the lookup: its uncontacted contacts leave the lookup
and its later replies are ignored.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable, Coroutine
from typing import Any

from kademlia.crawling import NodeSpiderCrawl, SpiderCrawl
from kademlia.node import Node

from swarm.dht.records import DropReason, Record
from swarm.types import PeerId

__all__ = [
    "DISTRUST_AFTER",
    "MIN_GRACE",
    "MIN_STALL",
    "STALL_FACTOR",
    "NodeCrawl",
    "RecordCrawl",
    "parse_node_list",
]

DISTRUST_AFTER = 2  # failed contacts from one replier before its contacts are dropped
MIN_GRACE = 0.05  # seconds to gather replies that come right after the first
STALL_FACTOR = 2.0
MIN_STALL = 0.5  # seconds without a reply before a query stops counting toward alpha


def parse_node_list(reply: object) -> list[Node]:
    """The well-formed ``(id, ip, port)`` triples of a find_node reply; the rest is ignored."""
    if not isinstance(reply, list | tuple):
        return []
    nodes = []
    for item in reply[:64]:
        if not isinstance(item, list | tuple) or len(item) != 3:
            continue
        node_id, ip, port = item
        if not (isinstance(node_id, bytes) and len(node_id) == 20):
            continue
        if not (isinstance(port, int) and 0 < port <= 65535 and isinstance(ip, str)):
            continue
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            continue
        nodes.append(Node(node_id, ip, port))
    return nodes


def _split(
    tasks: dict[bytes, asyncio.Future[Any]],
) -> tuple[dict[bytes, Any], dict[bytes, asyncio.Future[Any]]]:
    done = {
        node_id: (False, None) if task.cancelled() else task.result()
        for node_id, task in tasks.items()
        if task.done()
    }
    return done, {node_id: task for node_id, task in tasks.items() if not task.done()}


class _Provenance:
    """Which replier gave the lookup each contact, and the distrust of liars (see the
    module docstring). State lives in the crawl (one lookup)."""

    nearest: Any

    def _provenance(self) -> dict[str, Any]:
        state: dict[str, Any] = self.__dict__.setdefault(
            "_provenance_state",
            {"origin": {}, "failed": {}, "answered": {}, "distrusted": set(), "dead": set()},
        )
        return state

    def _learn(self, replier: bytes, nodes: list[Node]) -> None:
        """Push ``nodes`` (from ``replier``'s reply) unless the replier is distrusted."""
        st = self._provenance()
        if replier in st["distrusted"]:
            return
        origin = st["origin"]
        if replier in origin:
            st["answered"][origin[replier]] = st["answered"].get(origin[replier], 0) + 1
        held = {(n.ip, n.port): n.id for _, n in self.nearest.heap}
        source = self.nearest.get_node(replier)
        if source is not None:
            held.setdefault((source.ip, source.port), source.id)
        fresh = []
        for node in nodes:
            if node.id in st["dead"] or node.id in st["distrusted"]:
                continue
            if held.setdefault((node.ip, node.port), node.id) != node.id:
                continue  # another id at an address the lookup already holds
            origin.setdefault(node.id, replier)
            fresh.append(node)
        self.nearest.push(fresh)

    def _forget(self, dead: list[bytes]) -> None:
        """``dead`` did not answer: drop them, and distrust a replier whose contacts fail."""
        st = self._provenance()
        st["dead"].update(dead)
        drop = set(dead)
        for node_id in dead:
            replier = st["origin"].get(node_id)
            if replier is None or replier in st["distrusted"]:
                continue
            failed = st["failed"][replier] = st["failed"].get(replier, 0) + 1
            if failed >= DISTRUST_AFTER and failed > st["answered"].get(replier, 0):
                st["distrusted"].add(replier)
                drop.add(replier)
                contacted = self.nearest.contacted
                drop.update(
                    n.id
                    for _, n in self.nearest.heap
                    if st["origin"].get(n.id) == replier and n.id not in contacted
                )
        self.nearest.remove(list(drop))


class _InFlight(_Provenance):
    """`SpiderCrawl._find` with alpha queries in flight instead of rounds (see the module
    docstring)."""

    protocol: Any
    alpha: int
    node: Node
    nearest: Any

    def _late(self) -> dict[bytes, asyncio.Future[Any]]:
        """The queries in flight, by node id."""
        late: dict[bytes, asyncio.Future[Any]] = self.__dict__.setdefault("_late_tasks", {})
        return late

    def _sent_at(self) -> dict[bytes, float]:
        sent: dict[bytes, float] = self.__dict__.setdefault("_sent_times", {})
        return sent

    async def _find(self, rpcmethod: Callable[[Node, Node], Coroutine[Any, Any, Any]]) -> Any:
        """Ask, use the replies, ask again, until `_nodes_found` returns a result."""
        while True:
            result = await self._nodes_found(await self._next_replies(rpcmethod))
            if result is not None:
                return result

    async def _next_replies(
        self, rpcmethod: Callable[[Node, Node], Coroutine[Any, Any, Any]]
    ) -> dict[bytes, Any]:
        """Top the queries in flight up to alpha (stalled ones not counted), then wait for
        the next replies, or for the oldest query to stall; returns the replies (and
        timeouts) that came, by node id."""
        loop = asyncio.get_running_loop()
        flight, sent_at, stall = self._late(), self._sent_at(), self._stall()
        now = loop.time()
        fresh = [i for i, t in flight.items() if not t.done() and now - sent_at[i] < stall]
        for peer in self.nearest.get_uncontacted()[: max(0, self.alpha - len(fresh))]:
            flight[peer.id] = self.protocol.spawn(rpcmethod(peer, self.node))
            sent_at[peer.id] = now
            fresh.append(peer.id)
            self.nearest.mark_contacted(peer)
        waiting = [t for t in flight.values() if not t.done()]
        if fresh and len(waiting) == len(flight):  # nothing to use yet
            until = min(sent_at[i] for i in fresh) + stall
            done, pending = await asyncio.wait(
                waiting, timeout=max(0.0, until - loop.time()), return_when=asyncio.FIRST_COMPLETED
            )
            if done and pending:
                await asyncio.wait(pending, timeout=MIN_GRACE)
        replies, still = _split(flight)
        flight.clear()
        flight.update(still)
        now = loop.time()
        for node_id, result in replies.items():
            if result[0]:  # answered
                slowest = max(now - sent_at[node_id], self.__dict__.get("_slowest", 0.0))
                self.__dict__["_slowest"] = slowest
        return replies

    def _stall(self) -> float:
        """Seconds after which a query stops counting toward alpha (module docstring)."""
        slowest: float = self.__dict__.get("_slowest", 0.0)
        return max(MIN_STALL, STALL_FACTOR * slowest)

    async def _last_stragglers(self) -> dict[bytes, Any] | None:
        """Before concluding: wait for the queries in flight (each ends by its RPC
        timeout)."""
        late = self._late()
        if not late:
            return None
        await asyncio.wait(late.values())
        replies, _ = _split(late)
        late.clear()
        return replies

    async def _nodes_found(self, responses: dict[bytes, Any]) -> Any:
        """Use ``responses``; the lookup's result, or None to go on asking."""
        raise NotImplementedError


class NodeCrawl(_InFlight, NodeSpiderCrawl):  # type: ignore[misc]
    """Find the k closest nodes to an id (stock crawl with checked replies)."""

    async def _nodes_found(self, responses: dict[bytes, Any]) -> list[Node] | None:
        toremove = []
        for peer_id, result in responses.items():
            answered, reply = result[0], result[1]
            if not answered:
                toremove.append(peer_id)
            else:
                self._learn(peer_id, parse_node_list(reply))
        self._forget(toremove)
        if self.nearest.have_contacted_all():
            late = await self._last_stragglers()
            if late is not None:
                return await self._nodes_found(late)
            return list(self.nearest)
        return None


class RecordCrawl(_InFlight, SpiderCrawl):  # type: ignore[misc]
    """Collect record blobs for a key digest from up to ``quorum`` replicas."""

    def __init__(
        self,
        protocol: Any,
        node: Node,
        peers: list[Node],
        ksize: int,
        alpha: int,
        quorum: int,
        check: Callable[[bytes], Record | DropReason],
    ) -> None:
        super().__init__(protocol, node, peers, ksize, alpha)
        self.quorum = quorum
        self._check = check
        self.blobs: list[bytes] = []
        self.replicas = 0
        self._announcers: set[PeerId] = set()  # peer ids of the valid records seen so far
        self._settled = False  # the last replica read held no announcer the others lacked

    async def find(self) -> list[bytes]:
        """All record blobs the replicas returned (unverified)."""
        return await self._find(self.protocol.call_find_value)  # type: ignore[no-any-return]

    def _count_replica(self, blobs: list[bytes]) -> None:
        """A reply with at least one valid record is a replica; it settles the lookup when
        it holds no announcer that the replicas before it lacked."""
        held: set[PeerId] = set()
        for blob in blobs:
            checked = self._check(blob)  # the reader's check: once per blob and lookup
            if isinstance(checked, Record):
                held.add(checked.peer_id)
        if not held:
            return
        self.replicas += 1
        self._settled = held <= self._announcers
        self._announcers |= held

    async def _nodes_found(self, responses: dict[bytes, Any]) -> list[bytes] | None:
        toremove = []
        for peer_id, result in responses.items():
            answered, reply = result[0], result[1]
            if not answered:
                toremove.append(peer_id)
            elif isinstance(reply, dict):
                value = reply.get("value")
                listed = value if isinstance(value, list) else []
                blobs = [b for b in listed if isinstance(b, bytes)]
                self.blobs.extend(blobs)
                self._learn(peer_id, [])  # counts the answer for whoever gave us this peer
                self._count_replica(blobs)
            else:
                self._learn(peer_id, parse_node_list(reply))
        self._forget(toremove)
        if self.replicas >= self.quorum and self._settled:
            return self.blobs
        if self.nearest.have_contacted_all():
            late = await self._last_stragglers()
            if late is not None:
                return await self._nodes_found(late)
            return self.blobs
        return None
