"""`KademliaNode`: kademlia's ``Server`` with our protocol, storage and lookups.

Everything here runs on the DHT loop thread (see `swarm.dht.runner`); `swarm.dht.node` is the
trio face. Differs from stock ``Server``: no hourly republish by storing nodes (records carry
absolute expiries and owners re-announce), a store or lookup that finds no nodes returns
nothing instead of raising (stock ``set_digest`` raises ``ValueError`` from ``max([])``),
lookups merge records from several replicas (only replies with a valid record count as one),
joining is two steps (reach the initial peers; then, for a full node, look up our own
neighbourhood and ping what it found so they verify us), contacts not heard from lately are
pinged so dead ones leave, a client-only node stores nothing, and the socket gets a larger
receive buffer.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
from collections.abc import Callable

from kademlia.network import Server
from kademlia.node import Node

from swarm.dht.config import DHTConfig
from swarm.dht.crawling import NodeCrawl, RecordCrawl
from swarm.dht.links import DatagramLinks
from swarm.dht.proofs import ProofCache
from swarm.dht.protocol import SwarmProtocol
from swarm.dht.records import DropReason, Record, VerifiedRecords
from swarm.dht.stats import StatsCounter
from swarm.dht.storage import RecordStorage

__all__ = ["STORE_ANSWERED", "STORE_TAIL_S", "KademliaNode", "stored"]

log = logging.getLogger(__name__)

_RECEIVE_BUFFER_BYTES = 4 * 1024 * 1024
STORE_ANSWERED = 0.8  # a store waits for this share of its nodes' answers ...
STORE_TAIL_S = 0.5  # ... then for the rest as long again as that took, at least this long
_CHECKS_PER_INTERVAL = 8  # stale contacts pinged per contact_check_interval


class KademliaNode(Server):  # type: ignore[misc]
    """One node's routing table, UDP endpoint and record storage (DHT loop thread only)."""

    def __init__(
        self,
        config: DHTConfig,
        stats: StatsCounter,
        proofs: ProofCache | None = None,
        links: DatagramLinks | None = None,
    ) -> None:
        # signatures this node verified, shared by its storage (stores) and its reads
        cache = config.storage.verified_cache
        self.verified = VerifiedRecords(cache) if cache > 0 else None
        storage = RecordStorage(config, stats, proofs, self.verified)
        super().__init__(ksize=config.kademlia.ksize, alpha=config.kademlia.alpha, storage=storage)
        self.config = config
        self.stats = stats
        self.links = links
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
        if self.links is not None:  # tests: datagrams through emulated links
            name = sock.getsockname()
            self.protocol.transport.links = (self.links, (name[0], int(name[1])))
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RECEIVE_BUFFER_BYTES)
        except OSError:  # the kernel may cap it; the default still works, with more loss
            log.debug("could not raise the DHT socket's receive buffer")
        self.protocol.spawn(self._refresh_loop())
        self.protocol.spawn(self._liveness_loop())
        return int(sock.getsockname()[1])

    async def _liveness_loop(self) -> None:
        """Ping contacts not heard from for a while; one that misses two in a row leaves."""
        proto, interval = self._proto(), self.config.timing.contact_check_interval
        while True:
            await asyncio.sleep(interval)
            stale = proto.stale_contacts(interval, _CHECKS_PER_INTERVAL)
            await asyncio.gather(*(self._check_contact(n) for n in stale))

    async def _check_contact(self, node: Node) -> None:
        proto = self._proto()
        for _ in range(self.config.kademlia.evict_after_failures):
            if (await proto.call_ping(node)).ok:
                return

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.timing.refresh_interval)
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

    async def reach(self, addrs: list[tuple[str, int]]) -> int:
        """Ping ``addrs`` (they become contacts once they answer); returns how many answered."""
        proto = self._proto()
        answers = await asyncio.gather(*(proto.ping(addr, self.node.id) for addr in addrs))
        answered = 0
        for (ip, port), answer in zip(addrs, answers, strict=True):
            if answer.ok and answer.node_id is not None:
                proto.handle_call_response(answer, Node(answer.node_id, ip, port))
                answered += 1
        return answered

    async def find_neighbourhood(self) -> None:
        """Look up our own id, then ping the ``alpha`` closest nodes found (in the background:
        the join does not wait). Each ping echoes the token their crawl reply handed us, so they
        verify and add us; from their find_node replies others learn of us and verify us by
        asking us something (a reply verifies), so a few pings are enough."""
        proto = self._proto()
        nearest = proto.router.find_neighbors(self.node, self.alpha)
        if not nearest:
            return
        found = await NodeCrawl(proto, self.node, nearest, self.ksize, self.alpha).find()
        for node in found[: self.alpha]:
            proto.spawn(proto.call_ping(node))

    async def store(self, dkey: bytes, blob: bytes) -> int:
        """Store one record on the k nodes closest to ``dkey`` (and here, if we are one of
        them or know fewer than k); returns how many remote nodes took it by the time it
        returns (`stored`: it does not wait out the RPC timeouts of the last few)."""
        proto = self._proto()
        target = Node(dkey)
        nearest = proto.router.find_neighbors(target)
        nodes: list[Node] = []
        if nearest:
            nodes = await NodeCrawl(proto, target, nearest, self.ksize, self.alpha).find()
        closest = len(nodes) < self.ksize or self.node.distance_to(target) < max(
            n.distance_to(target) for n in nodes
        )
        if closest and not self.config.client_only:
            self.storage.merge(dkey, [blob])
        return await stored([proto.spawn(proto.store_records(n, dkey, [blob])) for n in nodes])

    async def fetch(
        self, dkey: bytes, check: Callable[[bytes], Record | DropReason]
    ) -> list[bytes]:
        """Record blobs for ``dkey``: our own copies plus those of up to ``get_quorum``
        replicas found by a lookup (stock ``get`` returns a local copy without asking).
        ``check`` verifies a blob; a reply counts as a replica only if one of its blobs checks
        out, so nodes answering with no (or only bad) records do not end the lookup."""
        proto = self._proto()
        local: list[bytes] = self.storage.get(dkey, [])
        target = Node(dkey)
        nearest = proto.router.find_neighbors(target)
        if not nearest:
            return local
        crawl = RecordCrawl(
            proto, target, nearest, self.ksize, self.alpha, self.config.kademlia.get_quorum, check
        )
        return local + await crawl.find()

    def routing_addresses(self) -> list[tuple[str, int]]:
        """(ip, port) of every contact in the routing table."""
        return [(n.ip, n.port) for n in self._proto().router.contacts()]

    async def aclose(self) -> None:
        """Close the socket and cancel this node's background work."""
        if self.transport is not None:
            self.transport.close()
        if self.protocol is not None:
            await self.protocol.aclose()


async def stored(stores: list[asyncio.Future[bool]]) -> int:
    """How many of ``stores`` (one per node, already sent) took the record: once every
    node answered, or once `STORE_ANSWERED` of them did and the rest had as long again
    (at least `STORE_TAIL_S`). A node that left answers nothing, and among the k closest
    nodes of a key of a swarm with churn one nearly always has: waiting for every answer
    made nearly every announce last the RPC timeout (2 s), though the record lay on the
    other nodes long before (the rebalancer's announced intents waited on it, twice per
    move). The stores not answered by then go on as the protocol's background tasks
    (cancelled when the node closes); their acknowledgements are not counted. Raises what
    a counted store raised."""
    if not stores:
        return 0
    loop = asyncio.get_running_loop()
    started = loop.time()
    need = math.ceil(STORE_ANSWERED * len(stores))
    pending: set[asyncio.Future[bool]] = set(stores)
    while len(stores) - len(pending) < need:
        _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    if pending:
        await asyncio.wait(pending, timeout=max(loop.time() - started, STORE_TAIL_S))
    return sum(1 for store in stores if store.done() and store.result())
