"""`SwarmProtocol`: kademlia's UDP protocol with our records, sealing, wire and guards.

Differences from stock ``KademliaProtocol`` (each guards a flaw of kademlia 2.2.3/rpcudp 5.0.1):

- contacts earn their place: a node id enters the routing table only when it answered a
  request of ours from the address we sent it to (every reply names its responder), or when
  its request echoes the address token we handed that (address, id) in an earlier reply.
  Being sent something proves nothing, so stock's ``welcome_if_new`` on every request is gone;
  client-only nodes (a flag in their requests) are never added; `ContactTable` caps contacts
  per address, IP and subnet;
- a new contact is handed the records of at most ``handoff_keys`` stored keys near its id
  (stock walks every stored key for every new id, before verifying it), within a node-wide
  ``handoff_rate``; an unverified address gets nothing but a reply;
- requests are answered within ``request_rate`` per source group; stores are merged into
  `RecordStorage` with the source group of their sender;
- datagrams are sealed with the swarm key when there is one; unauthenticated ones are dropped
  before they are parsed; malformed ones are dropped and counted (`swarm.dht.wire`);
- a reply counts only from the address the request went to;
- a contact leaves after ``evict_after_failures`` consecutive timeouts (not after one lost
  packet); `stale_contacts` lists those to check;
- no reply to an address that has not echoed our token exceeds `wire.AMPLIFICATION` times
  the bytes of the request it answers (RFC 9000 §8.1): a larger answer is replaced by a small
  one carrying the token, and the requester asks again echoing it (once per responder and
  token lifetime; a request without a token is padded so the usual find_node reply fits), so
  a forged source address cannot turn our replies into a reflected flood;
- the RPC timeout is ``DHTConfig.timing.rpc_timeout`` (one queue of deadlines per node, and
  the datagrams emulated links hold in one heap per loop: `swarm.dht.timers`); a reply too
  large for one datagram is counted and not sent; the background tasks it starts are
  tracked and cancelled by `aclose`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Coroutine
from typing import Any, NamedTuple

from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from kademlia.utils import digest

from swarm.dht.config import MAX_DATAGRAM_BYTES, DHTConfig
from swarm.dht.datagrams import SEAL_OVERHEAD, DatagramSeal
from swarm.dht.links import Address, DatagramLinks
from swarm.dht.routing import ContactTable
from swarm.dht.sources import AddressTokens, RateLimiter, SourceGroups
from swarm.dht.stats import StatsCounter
from swarm.dht.storage import RecordStorage
from swarm.dht.timers import Deadlines, LateSends
from swarm.dht.wire import (
    AMPLIFICATION,
    Request,
    Response,
    decode_datagram,
    encode_request,
    encode_response,
)

__all__ = ["Answer", "SwarmProtocol", "key_digest"]

log = logging.getLogger(__name__)

_STORE_CHUNK_BYTES = 7_000  # a store request stays under wire.MAX_REQUEST_BYTES
_TOKENS_REMEMBERED = 4_096


class Answer(NamedTuple):
    """The outcome of one request of ours: ``ok`` False on timeout; ``node_id`` is who
    answered (None on timeout), ``client_only`` whether it said it is a client-only node."""

    ok: bool
    value: Any
    node_id: bytes | None = None
    client_only: bool = False


class _Waiting(NamedTuple):
    """A request of ours awaiting its reply (by message id)."""

    future: asyncio.Future[Answer]
    where: tuple[str, int]
    name: str
    args: tuple[Any, ...]
    retried: bool


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
        self.links: tuple[DatagramLinks, Address] | None = None  # emulated links, our address

    def sendto(self, data: bytes, addr: Any = None) -> None:
        if len(data) > MAX_DATAGRAM_BYTES:
            self._stats.event("replies_too_large")
            log.warning("not sending a %d-byte datagram to %s: too large", len(data), addr)
            return
        self._stats.event("datagrams_sent")
        payload = self._seal.seal(data) if self._seal else data
        if self.links is not None:
            links, source = self.links
            delay = links.outgoing(source, (addr[0], addr[1]), len(payload))
            if delay is None:
                return  # lost on the (emulated) way
            if delay > 0:
                LateSends.for_loop(asyncio.get_running_loop()).hold(
                    delay, self.inner, payload, addr
                )
                return
        self.inner.sendto(payload, addr)

    def close(self) -> None:
        self.inner.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.inner.get_extra_info(name, default)


class SwarmProtocol(KademliaProtocol):  # type: ignore[misc]
    """The UDP endpoint of one DHT node. Lives on the DHT loop thread only."""

    def __init__(
        self, source_node: Node, storage: RecordStorage, config: DHTConfig, stats: StatsCounter
    ) -> None:
        super().__init__(source_node, storage, config.kademlia.ksize)
        self._deadlines = Deadlines(config.timing.rpc_timeout, self._timeout)
        self._config = config
        self._stats = stats
        self._seal = DatagramSeal(config.swarm_key) if config.swarm_key else None
        self._groups = SourceGroups(
            config.admission.cap_private_addresses, config.admission.private_groups
        )
        self.router = ContactTable(self, config, source_node, self._groups, self.spawn)
        self._tokens = AddressTokens()
        self._tokens_from: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._waiting: dict[bytes, _Waiting] = {}
        self._request_limits = RateLimiter(
            config.admission.request_rate, config.admission.request_burst
        )
        self._handoff_limit = RateLimiter(
            config.storage.handoff_rate, max(1.0, 2 * config.storage.handoff_rate)
        )
        self._failures: dict[bytes, int] = {}
        self._last_seen: dict[bytes, float] = {}
        self._tasks: set[asyncio.Future[Any]] = set()

    # datagrams ---------------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = _DatagramTransport(transport, self._seal, self._stats)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._stats.event("datagrams_received")
        if self._seal is not None:
            opened = self._seal.open(data)
            if opened is None:
                self._stats.event("datagrams_rejected")
                return
            received = len(data)
            data = opened
        else:
            received = len(data)
        decoded = decode_datagram(data)
        if decoded is None:
            self._stats.event("datagrams_malformed")
        elif isinstance(decoded[1], Request):
            self._accept_request(decoded[0], decoded[1], addr, received)
        else:
            self._accept_response(decoded[0], decoded[1], addr)

    def _accept_request(self, msg_id: bytes, request: Request, address: Any, received: int) -> None:
        ip, port = address[0], address[1]
        if not self._request_limits.allow(self._groups.subnet(ip, port)):
            self._stats.event("requests_rate_limited")
            return
        try:
            sender = _check_id(request.args[0])
            value = getattr(self, f"rpc_{request.name}")(address, *request.args)
        except (_BadRequest, TypeError):
            self._stats.event("datagrams_malformed")
            return
        node = Node(sender, ip, port)
        address_proven = self._tokens.check(request.token, ip, port, sender)
        token = None if address_proven else self._tokens.issue(ip, port, sender)
        me, client_only = self.source_node.id, self._config.client_only
        reply = encode_response(msg_id, value, node_id=me, client_only=client_only, token=token)
        overhead = SEAL_OVERHEAD if self._seal is not None else 0
        if not address_proven and len(reply) + overhead > AMPLIFICATION * received:
            self._stats.event("replies_need_token")
            reply = encode_response(
                msg_id, None, node_id=me, client_only=client_only, token=token, retry=True
            )
        self.transport.sendto(reply, address)
        if address_proven and not request.client_only:
            self._verified(node, displace=False)

    def _accept_response(self, msg_id: bytes, response: Response, address: Any) -> None:
        entry = self._waiting.get(msg_id)
        if entry is None or entry.where != (address[0], address[1]):
            return  # not awaited, or not from where the request went
        del self._waiting[msg_id]
        if response.token is not None:
            self._tokens_from.pop(entry.where, None)
            self._tokens_from[entry.where] = response.token
            while len(self._tokens_from) > _TOKENS_REMEMBERED:
                self._tokens_from.popitem(last=False)
        if entry.future.done():
            return
        if response.retry:
            if entry.retried:  # our token did not count there: give up as on a timeout
                entry.future.set_result(Answer(False, None))
            else:
                self._stats.event("requests_repeated_with_token")
                self._send(entry.future, entry.where, entry.name, entry.args, retried=True)
            return
        answer = Answer(True, response.value, response.node_id, response.client_only)
        entry.future.set_result(answer)

    def _timeout(self, msg_id: bytes) -> None:
        entry = self._waiting.pop(msg_id, None)
        if entry is not None and not entry.future.done():
            self._stats.event("rpc_timeouts")
            entry.future.set_result(Answer(False, None))

    # RPC handlers (peer input: every argument is checked; nothing here trusts the sender) --

    def rpc_ping(self, sender: Any, nodeid: object) -> Any:
        return self.source_node.id

    def rpc_store(self, sender: Any, nodeid: object, key: object, value: object) -> bool:
        dkey = _check_id(key)
        if self._config.client_only:
            return False  # a client stores nothing for others
        source = self._groups.group(sender[0], sender[1])
        held = self.storage.merge(dkey, value, source=source)
        return isinstance(value, list) and held == len(value)

    def rpc_find_node(self, sender: Any, nodeid: object, key: object) -> Any:
        asker = Node(_check_id(nodeid), sender[0], sender[1])
        neighbors = self.router.find_neighbors(Node(_check_id(key)), exclude=asker)
        return [tuple(n) for n in neighbors]

    def rpc_find_value(self, sender: Any, nodeid: object, key: object) -> Any:
        value = None if self._config.client_only else self.storage.get(_check_id(key), None)
        if value is None:
            return self.rpc_find_node(sender, nodeid, key)
        return {"value": value}

    # requests of ours --------------------------------------------------------------------

    def _request(self, address: Any, name: str, *args: Any) -> asyncio.Future[Answer]:
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._send(future, (address[0], address[1]), name, args, retried=False)
        return future

    def _send(
        self,
        future: asyncio.Future[Answer],
        where: tuple[str, int],
        name: str,
        args: tuple[Any, ...],
        *,
        retried: bool,
    ) -> None:
        """Send one request whose answer resolves ``future`` (echoing the token ``where``
        handed us, if any; padded if none)."""
        token = self._tokens_from.get(where)
        msg_id = os.urandom(20)
        client_only = self._config.client_only
        data = encode_request(
            msg_id, name, args, client_only=client_only, token=token, pad=token is None
        )
        self._deadlines.add(msg_id)
        self._waiting[msg_id] = _Waiting(future, where, name, args, retried)
        self.transport.sendto(data, where)

    def ping(self, address: Any, nodeid: bytes) -> asyncio.Future[Answer]:
        return self._request(address, "ping", nodeid)

    def store(self, address: Any, nodeid: bytes, key: bytes, value: Any) -> asyncio.Future[Answer]:
        return self._request(address, "store", nodeid, key, value)

    def find_node(self, address: Any, nodeid: bytes, key: bytes) -> asyncio.Future[Answer]:
        return self._request(address, "find_node", nodeid, key)

    def find_value(self, address: Any, nodeid: bytes, key: bytes) -> asyncio.Future[Answer]:
        return self._request(address, "find_value", nodeid, key)

    # routing -----------------------------------------------------------------------------

    def handle_call_response(self, result: Any, node: Node) -> Answer:
        """After a request of ours to ``node``: count a timeout toward its eviction, or verify
        whoever answered from its address (the claimed id, or the one that really is there)."""
        answer = result if isinstance(result, Answer) else Answer(*result)
        if not answer.ok:
            failures = self._failures.get(node.id, 0) + 1
            if failures >= self._config.kademlia.evict_after_failures:
                self._forget(node)
            else:
                self._failures[node.id] = failures
            return answer
        self._failures.pop(node.id, None)
        if answer.node_id is not None and not answer.client_only:
            self._verified(Node(answer.node_id, node.ip, node.port), displace=True)
        return answer

    def _forget(self, node: Node) -> None:
        self._failures.pop(node.id, None)
        self._last_seen.pop(node.id, None)
        if not self.router.is_new_node(node):
            self._stats.event("contacts_evicted")
            self.router.remove_contact(node)
            self._update_routing_gauge()

    def _verified(self, node: Node, *, displace: bool) -> None:
        """``node`` proved it is at its address: add it (within the caps) or refresh it."""
        new = self.router.is_new_node(node)
        if not self.router.add_verified(node, displace=displace):
            if new:
                self._stats.event("contacts_refused")
            return
        self._last_seen[node.id] = time.monotonic()
        if new:
            self._update_routing_gauge()
            if not self._config.client_only:
                self._hand_off(node)

    def welcome_if_new(self, node: Node) -> None:
        """Stock kademlia's entry point for unverified nodes: does nothing here (contacts are
        added by `handle_call_response` and token-proven requests only)."""

    def _hand_off(self, node: Node) -> None:
        """Send ``node`` (just added) the records of the stored keys near it that it should now
        hold (we being the closest node to them we know apart from it, and it closer than the
        farthest of the k): at most ``handoff_keys`` keys, within ``handoff_rate`` for the
        whole node."""
        for dkey in self.storage.keys_near(node.id, self._config.storage.handoff_keys):
            keynode = Node(dkey)
            neighbors = self.router.find_neighbors(keynode, exclude=node)
            if neighbors:
                new_node_close = node.distance_to(keynode) < neighbors[-1].distance_to(keynode)
                this_closest = self.source_node.distance_to(keynode) < neighbors[0].distance_to(
                    keynode
                )
                if not (new_node_close and this_closest):
                    continue
            blobs = self.storage.get(dkey)
            if not blobs:
                continue
            if not self._handoff_limit.allow("handoff"):
                self._stats.event("handoffs_skipped")
                return
            self._stats.event("handoffs")
            self.spawn(self.store_records(node, dkey, blobs))

    def stale_contacts(self, older_than: float, limit: int) -> list[Node]:
        """Up to ``limit`` contacts not heard from for ``older_than`` seconds, stalest first."""
        cutoff = time.monotonic() - older_than
        seen = [(self._last_seen.get(n.id, 0.0), n) for n in self.router.contacts()]
        stale = sorted((s for s in seen if s[0] < cutoff), key=lambda s: s[0])
        return [n for _, n in stale[:limit]]

    def _update_routing_gauge(self) -> None:
        self._stats.gauge("routing_table_size", len(self.router.contacts()))

    # outgoing ----------------------------------------------------------------------------

    async def call_ping(self, node_to_ask: Node) -> Answer:
        result = await self.ping((node_to_ask.ip, node_to_ask.port), self.source_node.id)
        return self.handle_call_response(result, node_to_ask)

    async def store_records(self, node: Node, dkey: bytes, blobs: list[bytes]) -> bool:
        """Send records to ``node`` in store requests small enough for one datagram; True if
        the node took all of them."""
        chunks: list[list[bytes]] = [[]]
        size = 0
        for blob in blobs:
            if size + len(blob) > _STORE_CHUNK_BYTES and chunks[-1]:
                chunks.append([])
                size = 0
            chunks[-1].append(blob)
            size += len(blob) + 5
        results = await asyncio.gather(*(self.call_store(node, dkey, c) for c in chunks))
        return all(ok and reply is True for ok, reply, *_ in results)

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
        self._deadlines.close()
        for msg_id in list(self._waiting):
            entry = self._waiting.pop(msg_id)
            if not entry.future.done():
                entry.future.set_result(Answer(False, None))
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)


def key_digest(key: str) -> bytes:
    """The 20-byte kademlia id of a text key (SHA-1 of its UTF-8)."""
    return bytes(digest(key.encode("utf-8")))
