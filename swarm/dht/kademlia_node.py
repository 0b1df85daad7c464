"""`KademliaNode`: kademlia's ``Server`` with our protocol, storage and lookups.

Everything here runs on the DHT loop thread (see `swarm.dht.runner`); `swarm.dht.node` is the
trio face. Differs from stock ``Server``: no hourly republish by storing nodes (records carry
absolute expiries and owners re-announce), a store or lookup that finds no nodes returns
nothing instead of raising (stock ``set_digest`` raises ``ValueError`` from ``max([])``),
lookups merge records from several replicas, and the socket gets a larger receive buffer.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from kademlia.network import Server
from kademlia.node import Node

from swarm.dht.config import DHTConfig
from swarm.dht.crawling import NodeCrawl, RecordCrawl
from swarm.dht.protocol import SwarmProtocol
from swarm.dht.stats import StatsCounter
from swarm.dht.storage import RecordStorage

__all__ = ["KademliaNode"]

log = logging.getLogger(__name__)

_RECEIVE_BUFFER_BYTES = 4 * 1024 * 1024


class KademliaNode(Server):  # type: ignore[misc]
    """One node's routing table, UDP endpoint and record storage (DHT loop thread only)."""

    def __init__(self, config: DHTConfig, stats: StatsCounter) -> None:
        super().__init__(
            ksize=config.ksize, alpha=config.alpha, storage=RecordStorage(config, stats)
        )
        self.config = config
        self.stats = stats
        self.protocol: SwarmProtocol | None = None

    def _create_protocol(self) -> SwarmProtocol:
        return SwarmProtocol(self.node, self.storage, self.config, self.stats)

    async def listen(self, port: int, interface: str = "127.0.0.1") -> int:  # type: ignore[override]
        """Bind the UDP socket; returns the bound port."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in interface else socket.AF_INET
        self.transport, self.protocol = await loop.create_datagram_endpoint(
            self._create_protocol, local_addr=(interface, port), family=family
        )
        sock = self.transport.get_extra_info("socket")
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RECEIVE_BUFFER_BYTES)
        except OSError:  # the kernel may cap it; the default still works, with more loss
            log.debug("could not raise the DHT socket's receive buffer")
        self.protocol.spawn(self._refresh_loop())
        return int(sock.getsockname()[1])

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.refresh_interval)
            await self._refresh_table()

    async def _refresh_table(self) -> None:
        proto = self._proto()
        crawls = []
        for node_id in proto.get_refresh_ids():
            node = Node(node_id)
            nearest = proto.router.find_neighbors(node, self.alpha)
            crawls.append(NodeCrawl(proto, node, nearest, self.ksize, self.alpha).find())
        await asyncio.gather(*crawls)

    def _proto(self) -> SwarmProtocol:
        if self.protocol is None:
            raise RuntimeError("the DHT node is not listening")
        return self.protocol

    async def join(self, addrs: list[tuple[str, int]]) -> int:
        """Ping ``addrs`` and crawl for our own id; returns how many initial peers answered."""
        proto = self._proto()
        answers = await asyncio.gather(*(proto.ping(addr, self.node.id) for addr in addrs))
        nodes = []
        for addr, (answered, node_id) in zip(addrs, answers, strict=True):
            if answered and isinstance(node_id, bytes) and len(node_id) == 20:
                nodes.append(Node(node_id, addr[0], addr[1]))
        for node in nodes:
            proto.welcome_if_new(node)
        if nodes:
            await NodeCrawl(proto, self.node, nodes, self.ksize, self.alpha).find()
        return len(nodes)

    async def store(self, dkey: bytes, blob: bytes) -> int:
        """Store one record on the k nodes closest to ``dkey`` (and here, if we are one of
        them or know fewer than k); returns how many remote nodes took it."""
        proto = self._proto()
        target = Node(dkey)
        nearest = proto.router.find_neighbors(target)
        nodes: list[Node] = []
        if nearest:
            nodes = await NodeCrawl(proto, target, nearest, self.ksize, self.alpha).find()
        if len(nodes) < self.ksize or self.node.distance_to(target) < max(
            n.distance_to(target) for n in nodes
        ):
            self.storage.merge(dkey, [blob])
        results = await asyncio.gather(*(proto.store_records(n, dkey, [blob]) for n in nodes))
        return sum(results)

    async def fetch(self, dkey: bytes) -> list[bytes]:
        """Record blobs for ``dkey``: our own copies plus those of up to ``get_quorum``
        replicas found by a lookup (stock ``get`` returns a local copy without asking)."""
        proto = self._proto()
        local: list[bytes] = self.storage.get(dkey, [])
        target = Node(dkey)
        nearest = proto.router.find_neighbors(target)
        if not nearest:
            return local
        crawl = RecordCrawl(proto, target, nearest, self.ksize, self.alpha, self.config.get_quorum)
        return local + await crawl.find()

    def routing_addresses(self) -> list[tuple[str, int]]:
        """(ip, port) of every contact in the routing table."""
        proto = self._proto()
        return [(n.ip, n.port) for b in proto.router.buckets for n in b.get_nodes()]

    async def aclose(self) -> None:
        """Close the socket and cancel this node's background work."""
        if self.transport is not None:
            self.transport.close()
        if self.protocol is not None:
            await self.protocol.aclose()

    def contact_ids(self) -> list[Any]:
        return [n.id for b in self._proto().router.buckets for n in b.get_nodes()]
