"""`ContactTable`: kademlia's routing table with caps on who may fill it.

The protocol (`swarm.dht.protocol`) adds a contact only once it is verified; the table then
refuses it if its address already belongs to another contact (one ``ip:port`` is one node,
however many ids it claims), or if its IP or subnet already holds its share of the table or
of the bucket it falls in (`AdmissionConfig.max_contacts_per_*`; groups as in
`swarm.dht.sources`).
A contact promoted from a bucket's replacement cache is held to the same caps. The stock
table's fire-and-forget ping of a full bucket's head goes through the protocol's tracked tasks.

`get_bucket_for` and `find_neighbors` give stock's answers (a node asks them for nearly every
datagram) without its linear scan of the buckets and its per-contact heap and iterator
objects: a bisection over the buckets' upper bounds, and the same walk out from the target's
bucket as stock's ``TableTraverser`` (tests/dht/test_routing.py compares them).
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from kademlia.node import Node
from kademlia.routing import KBucket, RoutingTable

from swarm.dht.config import DHTConfig
from swarm.dht.sources import SourceGroups

__all__ = ["ContactTable"]


@dataclass
class _Index:
    """Who holds each address, and contacts per IP and per subnet (rebuilt after a change)."""

    by_address: dict[tuple[str, int], Node] = field(default_factory=dict)
    per_ip: Counter[str] = field(default_factory=Counter)
    per_subnet: Counter[str] = field(default_factory=Counter)


class ContactTable(RoutingTable):  # type: ignore[misc]
    """The contacts of one node (DHT loop thread only)."""

    def __init__(
        self,
        protocol: Any,
        config: DHTConfig,
        node: Node,
        groups: SourceGroups,
        spawn: Callable[[Coroutine[Any, Any, Any]], Any],
    ) -> None:
        self._uppers: list[int] | None = None  # each bucket's range[1] (None: rebuild)
        super().__init__(protocol, config.kademlia.ksize, node)
        self._config = config
        self._groups = groups
        self._spawn = spawn
        self._index: _Index | None = None  # None: the membership changed since it was built

    def _current(self) -> _Index:
        if self._index is None:
            index = _Index()
            for held in self.contacts():
                index.by_address[(held.ip, held.port)] = held
                ip_key, subnet_key = self._groups.keys(held.ip, held.port)
                index.per_ip[ip_key] += 1
                index.per_subnet[subnet_key] += 1
            self._index = index
        return self._index

    def _count(self, node: Node, step: int) -> None:
        """Keep the index in step with one contact joining (+1) or leaving (-1)."""
        index = self._index
        if index is None:
            return  # rebuilt when next needed
        ip_key, subnet_key = self._groups.keys(node.ip, node.port)
        index.per_ip[ip_key] += step
        index.per_subnet[subnet_key] += step
        if step > 0:
            index.by_address[(node.ip, node.port)] = node
        else:
            index.by_address.pop((node.ip, node.port), None)

    def contacts(self) -> list[Node]:
        return [n for bucket in self.buckets for n in bucket.get_nodes()]

    def at_address(self, ip: str, port: int) -> Node | None:
        """The contact we hold at ``ip:port``, if any."""
        return self._current().by_address.get((ip, port))

    def within_caps(self, node: Node) -> bool:
        """Whether ``node`` (not yet held) fits the per-IP and per-subnet caps."""
        cfg, index = self._config, self._current()
        ip_key, subnet_key = self._groups.keys(node.ip, node.port)
        if index.per_ip[ip_key] >= cfg.admission.max_contacts_per_ip:
            return False
        if index.per_subnet[subnet_key] >= cfg.admission.max_contacts_per_subnet:
            return False
        bucket = self.buckets[self.get_bucket_for(node)]
        in_bucket = sum(
            self._groups.subnet(held.ip, held.port) == subnet_key for held in bucket.nodes.values()
        )
        return in_bucket < cfg.admission.max_contacts_per_subnet_in_bucket

    def add_verified(self, node: Node, *, displace: bool) -> bool:
        """Add (or refresh) a verified contact; True if it is in the table afterwards.

        ``displace``: a contact held at the same address under another id is replaced (the
        address itself just answered as ``node``); otherwise the one held is kept.
        """
        if not self.is_new_node(node):
            held = self.buckets[self.get_bucket_for(node)].nodes[node.id]
            if (held.ip, held.port) != (node.ip, node.port):
                self._index = None
            self.add_contact(node)  # moves it to the bucket's tail, updates its address
            return True
        same = self.at_address(node.ip, node.port)
        if same is not None:
            if not displace:
                return False
            self.remove_contact(same)
        if not self.within_caps(node):
            return False
        self.add_contact(node)
        return not self.is_new_node(node)

    def add_contact(self, node: Node) -> None:
        index = self.get_bucket_for(node)
        bucket = self.buckets[index]
        was_held = node.id in bucket.nodes
        if bucket.add_node(node):
            if not was_held:
                self._count(node, +1)
            return
        # Kademlia §4.2: split if the bucket holds our own id or its depth is not 0 mod 5
        if bucket.has_in_range(self.node) or bucket.depth() % 5 != 0:
            self.split_bucket(index)
            self.add_contact(node)
        else:
            self._spawn(self.protocol.call_ping(bucket.head()))

    def split_bucket(self, index: int) -> None:
        self._index = None  # replacements may move up into the new buckets
        self._uppers = None
        super().split_bucket(index)

    def flush(self) -> None:
        self._uppers = None
        super().flush()

    def get_bucket_for(self, node: Node) -> int:
        """The index of the first bucket whose ``range[1]`` exceeds the node's id (stock's
        rule, by bisection). Raises ValueError for an id beyond 160 bits (stock: None)."""
        uppers = self._uppers
        if uppers is None:
            uppers = self._uppers = [bucket.range[1] for bucket in self.buckets]
        index = bisect.bisect_right(uppers, node.long_id)
        if index == len(uppers):
            raise ValueError("a node id beyond the 160-bit id space")
        return index

    def find_neighbors(
        self, node: Node, k: int | None = None, exclude: Node | None = None
    ) -> list[Node]:
        """Stock's neighbours: the first ``k`` contacts (not ``node`` itself, nor any at
        ``exclude``'s address) met walking out from ``node``'s bucket as ``TableTraverser``
        does (that bucket from its newest contact, then one bucket to the left, one to the
        right, and so on; it stops when the right side runs out on its turn), closest first."""
        k = k or self.ksize
        buckets = self.buckets
        index = self.get_bucket_for(node)
        buckets[index].touch_last_updated()
        left, right = buckets[:index], buckets[index + 1 :]
        bucket, turn_left = buckets[index], True
        picked: list[Node] = []
        own, home = node.id, None if exclude is None else (exclude.ip, exclude.port)
        while True:
            for held in reversed(bucket.nodes.values()):
                if held.id != own and (home is None or (held.ip, held.port) != home):
                    picked.append(held)
                    if len(picked) == k:
                        target = node.long_id
                        return sorted(picked, key=lambda n: n.long_id ^ target)
            if turn_left and left:
                bucket, turn_left = left.pop(), False
            elif right:
                bucket, turn_left = right.pop(0), True
            else:
                target = node.long_id
                return sorted(picked, key=lambda n: n.long_id ^ target)

    def remove_contact(self, node: Node) -> None:
        bucket: KBucket = self.buckets[self.get_bucket_for(node)]
        before = set(bucket.nodes)
        held = bucket.nodes.get(node.id)
        bucket.remove_node(node)
        if held is not None:
            self._count(held, -1)
        for promoted in [n for i, n in bucket.nodes.items() if i not in before]:
            # a replacement moved up: it must still fit the caps and own its address
            del bucket.nodes[promoted.id]
            same = self.at_address(promoted.ip, promoted.port)
            if same is None and self.within_caps(promoted):
                bucket.nodes[promoted.id] = promoted
                self._count(promoted, +1)
