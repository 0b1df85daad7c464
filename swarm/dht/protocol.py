"""`SwarmProtocol`: kademlia's UDP protocol with our records, sealing and guards.

Differences from stock ``KademliaProtocol`` (each guards a flaw of kademlia 2.2.3/rpcudp 5.0.1):

- datagrams are sealed with the swarm key when there is one; unauthenticated ones are dropped
  before they are parsed, so their senders never enter the routing table;
- malformed datagrams, unknown RPC names and bad arguments are dropped and counted instead of
  raising inside a fire-and-forget task;
- ``rpc_store`` merges signed records (`RecordStorage`) instead of overwriting the key;
- ``welcome_if_new`` hands stored keys to new nodes using the stored digest (stock hashes the
  digest a second time, so it hands the wrong keys to the wrong nodes);
- a contact leaves the routing table after ``evict_after_failures`` consecutive timeouts, not
  after one lost packet;
- the RPC timeout is ``DHTConfig.rpc_timeout`` (stock: a fixed 5 s);
- a reply too large for one datagram is counted and not sent (stock sends and it is lost);
- the background tasks it starts are tracked and cancelled by `close`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

import umsgpack  # type: ignore[import-untyped]
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from kademlia.utils import digest

from swarm.dht.config import MAX_DATAGRAM_BYTES, DHTConfig
from swarm.dht.datagrams import DatagramSeal
from swarm.dht.stats import StatsCounter
from swarm.dht.storage import RecordStorage

__all__ = ["SwarmProtocol"]

log = logging.getLogger(__name__)

_REQUEST, _RESPONSE = b"\x00", b"\x01"
_RPC_NAMES = frozenset({"ping", "store", "find_node", "find_value"})
_STORE_CHUNK_BYTES = 7_000  # rpcudp refuses requests over 8 KiB


class _BadRequest(Exception):
    """A peer's RPC arguments do not have the expected types (internal; never escapes)."""


def _check_id(value: object) -> bytes:
    if not isinstance(value, bytes) or len(value) != 20:
        raise _BadRequest("a node id or key digest is 20 bytes")
    return value


class _DatagramTransport:
    """Wraps the UDP transport so every outgoing datagram is sealed and size-checked."""

    def __init__(self, transport: Any, seal: DatagramSeal | None, stats: StatsCounter) -> None:
        self.inner = transport
        self._seal = seal
        self._stats = stats

    def sendto(self, data: bytes, addr: Any = None) -> None:
        if len(data) > MAX_DATAGRAM_BYTES:
            self._stats.event("replies_too_large")
            log.warning("not sending a %d-byte datagram to %s: too large", len(data), addr)
            return
        self.inner.sendto(self._seal.seal(data) if self._seal else data, addr)

    def close(self) -> None:
        self.inner.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.inner.get_extra_info(name, default)


class SwarmProtocol(KademliaProtocol):  # type: ignore[misc]
    """The UDP endpoint of one DHT node. Lives on the DHT loop thread only."""

    def __init__(
        self, source_node: Node, storage: RecordStorage, config: DHTConfig, stats: StatsCounter
    ) -> None:
        super().__init__(source_node, storage, config.ksize)
        self._wait_timeout = config.rpc_timeout
        self._config = config
        self._stats = stats
        self._seal = DatagramSeal(config.swarm_key) if config.swarm_key else None
        self._failures: dict[bytes, int] = {}
        self._tasks: set[asyncio.Future[Any]] = set()

    # datagrams ---------------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = _DatagramTransport(transport, self._seal, self._stats)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self._seal is not None:
            opened = self._seal.open(data)
            if opened is None:
                self._stats.event("datagrams_rejected")
                return
            data = opened
        self.spawn(self._solve_datagram(data, addr))

    async def _solve_datagram(self, datagram: bytes, address: Any) -> None:
        if len(datagram) < 22:
            self._stats.event("datagrams_malformed")
            return
        msg_id, kind = datagram[1:21], datagram[:1]
        try:
            data = umsgpack.unpackb(datagram[21:])
        except Exception:  # umsgpack raises many types on bad input; all mean "malformed"
            self._stats.event("datagrams_malformed")
            return
        if kind == _REQUEST:
            await self._accept_request(msg_id, data, address)
        elif kind == _RESPONSE:
            self._accept_response(msg_id, data, address)
        else:
            self._stats.event("datagrams_malformed")

    async def _accept_request(self, msg_id: bytes, data: Any, address: Any) -> None:
        ok_shape = isinstance(data, list) and len(data) == 2 and isinstance(data[1], list | tuple)
        if not ok_shape or data[0] not in _RPC_NAMES:
            self._stats.event("datagrams_malformed")
            return
        funcname, args = data
        try:
            response = getattr(self, f"rpc_{funcname}")(address, *args)
        except (_BadRequest, TypeError):
            self._stats.event("datagrams_malformed")
            return
        self.transport.sendto(_RESPONSE + msg_id + umsgpack.packb(response), address)

    def _accept_response(self, msg_id: bytes, data: Any, address: Any) -> None:
        entry = self._outstanding.pop(msg_id, None)
        if entry is None:
            return
        future, timeout = entry
        timeout.cancel()
        if not future.done():
            future.set_result((True, data))

    def _timeout(self, msg_id: bytes) -> None:
        entry = self._outstanding.pop(msg_id, None)
        if entry is not None and not entry[0].done():
            entry[0].set_result((False, None))

    # RPC handlers (peer input: every argument is checked) --------------------------------

    def rpc_ping(self, sender: Any, nodeid: object) -> Any:
        return super().rpc_ping(sender, _check_id(nodeid))

    def rpc_store(self, sender: Any, nodeid: object, key: object, value: object) -> bool:
        source = Node(_check_id(nodeid), sender[0], sender[1])
        self.welcome_if_new(source)
        held = self.storage.merge(_check_id(key), value)
        return isinstance(value, list) and held == len(value)

    def rpc_find_node(self, sender: Any, nodeid: object, key: object) -> Any:
        return super().rpc_find_node(sender, _check_id(nodeid), _check_id(key))

    def rpc_find_value(self, sender: Any, nodeid: object, key: object) -> Any:
        source = Node(_check_id(nodeid), sender[0], sender[1])
        self.welcome_if_new(source)
        value = self.storage.get(_check_id(key), None)
        if value is None:
            return self.rpc_find_node(sender, nodeid, key)
        return {"value": value}

    # routing -----------------------------------------------------------------------------

    def welcome_if_new(self, node: Node) -> None:
        """Add a new contact; hand it the keys it is now among the closest for.

        Stock kademlia computes ``Node(digest(key))`` here although the storage key already is
        the digest; we use the stored digest itself.
        """
        if not self.router.is_new_node(node):
            return
        for dkey, blobs in self.storage:
            keynode = Node(dkey)
            neighbors = self.router.find_neighbors(keynode)
            if neighbors:
                last = neighbors[-1].distance_to(keynode)
                new_node_close = node.distance_to(keynode) < last
                first = neighbors[0].distance_to(keynode)
                this_closest = self.source_node.distance_to(keynode) < first
            if not neighbors or (new_node_close and this_closest):
                self.spawn(self.store_records(node, dkey, blobs))
        self.router.add_contact(node)
        self._update_routing_gauge()

    def handle_call_response(self, result: Any, node: Node) -> Any:
        if not result[0]:
            failures = self._failures.get(node.id, 0) + 1
            if failures >= self._config.evict_after_failures:
                self._failures.pop(node.id, None)
                if not self.router.is_new_node(node):
                    self._stats.event("contacts_evicted")
                self.router.remove_contact(node)
                self._update_routing_gauge()
            else:
                self._failures[node.id] = failures
            return result
        self._failures.pop(node.id, None)
        self.welcome_if_new(node)
        return result

    def _update_routing_gauge(self) -> None:
        size = sum(len(bucket) for bucket in self.router.buckets)
        self._stats.gauge("routing_table_size", size)

    # outgoing ----------------------------------------------------------------------------

    async def store_records(self, node: Node, dkey: bytes, blobs: list[bytes]) -> bool:
        """Send records to ``node`` in store requests small enough for rpcudp; True if the node
        took all of them."""
        chunks: list[list[bytes]] = [[]]
        size = 0
        for blob in blobs:
            if size + len(blob) > _STORE_CHUNK_BYTES and chunks[-1]:
                chunks.append([])
                size = 0
            chunks[-1].append(blob)
            size += len(blob) + 5
        results = await asyncio.gather(*(self.call_store(node, dkey, c) for c in chunks))
        return all(ok and reply is True for ok, reply in results)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Future[Any]:
        """Run a background coroutine that `aclose` will cancel; returns its task (a caller
        may await it, or stop waiting and leave it to finish on its own)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("DHT background task failed", exc_info=task.exception())

    async def aclose(self) -> None:
        """Cancel background tasks (waiting up to a second for them to unwind) and pending
        calls (their callers see a timeout)."""
        for msg_id in list(self._outstanding):
            future, timeout = self._outstanding.pop(msg_id)
            timeout.cancel()
            if not future.done():
                future.set_result((False, None))
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)


def key_digest(key: str) -> bytes:
    """The 20-byte kademlia id of a text key (SHA-1 of its UTF-8)."""
    return bytes(digest(key.encode("utf-8")))
