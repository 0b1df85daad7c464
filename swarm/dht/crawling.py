"""Lookups that merge instead of voting, and that never trust a peer's reply shape.

Stock ``ValueSpiderCrawl`` stops at the first round that finds a value and returns the most
common value among that round's replies (a dict value crashes it: unhashable); its node lists
are turned into ``Node`` objects without checks. `RecordCrawl` keeps asking until
``quorum`` nodes returned records (or every one of the k closest was asked) and returns all the
record blobs it saw, for the reader to verify and merge by subkey.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from kademlia.crawling import NodeSpiderCrawl, SpiderCrawl
from kademlia.node import Node

__all__ = ["NodeCrawl", "RecordCrawl", "parse_node_list"]


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


class NodeCrawl(NodeSpiderCrawl):  # type: ignore[misc]
    """Find the k closest nodes to an id (stock crawl with checked replies)."""

    async def _nodes_found(self, responses: dict[bytes, Any]) -> list[Node]:
        toremove = []
        for peer_id, (answered, reply) in responses.items():
            if not answered:
                toremove.append(peer_id)
            else:
                self.nearest.push(parse_node_list(reply))
        self.nearest.remove(toremove)
        if self.nearest.have_contacted_all():
            return list(self.nearest)
        return await self.find()  # type: ignore[no-any-return]


class RecordCrawl(SpiderCrawl):  # type: ignore[misc]
    """Collect record blobs for a key digest from up to ``quorum`` replicas."""

    def __init__(
        self, protocol: Any, node: Node, peers: list[Node], ksize: int, alpha: int, quorum: int
    ) -> None:
        super().__init__(protocol, node, peers, ksize, alpha)
        self.quorum = quorum
        self.blobs: list[bytes] = []
        self.replicas = 0

    async def find(self) -> list[bytes]:
        """All record blobs the replicas returned (unverified)."""
        return await self._find(self.protocol.call_find_value)  # type: ignore[no-any-return]

    async def _nodes_found(self, responses: dict[bytes, Any]) -> list[bytes]:
        toremove = []
        for peer_id, (answered, reply) in responses.items():
            if not answered:
                toremove.append(peer_id)
            elif isinstance(reply, dict):
                value = reply.get("value")
                if isinstance(value, list):
                    self.blobs.extend(b for b in value if isinstance(b, bytes))
                    self.replicas += 1
            else:
                self.nearest.push(parse_node_list(reply))
        self.nearest.remove(toremove)
        if self.replicas >= self.quorum or self.nearest.have_contacted_all():
            return self.blobs
        return await self.find()
