"""The defences of issue 14 one at a time, without a network: source groups, tokens, rate
limits, routing-table caps, storage quotas and fairness, the key index for hand-offs."""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

from kademlia.node import Node

from swarm.dht import (
    AdmissionConfig,
    DHTConfig,
    StorageConfig,
)
from swarm.dht.protocol import SwarmProtocol
from swarm.dht.records import make_record
from swarm.dht.routing import ContactTable
from swarm.dht.sources import AddressTokens, RateLimiter, SourceGroups
from swarm.dht.stats import StatsCounter
from swarm.dht.storage import RecordStorage
from swarm.dht.wire import Request, Response, decode_datagram, encode_request, encode_response
from swarm.identity import Identity

WRITER = Identity.from_seed(b"writer")


def _record(key: str, identity: Identity = WRITER, ttl: float = 60.0) -> tuple[bytes, list[bytes]]:
    """(key digest, [one signed record]): the arguments of `RecordStorage.merge`."""
    blob = make_record(identity, key, {"k": key}, time.time() + ttl, 1, 1200).encoded
    return hashlib.sha1(key.encode()).digest(), [blob]


def test_source_groups() -> None:
    groups = SourceGroups(cap_private=False)
    assert groups.keys("93.184.216.7", 1) == ("93.184.216.7", "93.184.216.0/24")
    assert groups.subnet("2a01:4f8:1:2:3::4", 5) == "2a01:4f8:1:2::/64"
    assert groups.subnet("::ffff:93.184.216.9", 5) == "93.184.216.0/24"
    assert groups.keys("127.0.0.1", 4000) == ("127.0.0.1:4000", "127.0.0.1:4000")  # a LAN
    assert groups.subnet("192.168.1.2", 7) == "192.168.1.2:7"
    assert groups.subnet("fe80::1", 7) == "fe80::1:7"
    assert SourceGroups(cap_private=True).subnet("127.0.0.1", 4000) == "127.0.0.0/24"


def test_address_tokens_bind_address_and_id() -> None:
    tokens, node_id = AddressTokens(lifetime=100.0), os.urandom(20)
    token = tokens.issue("81.2.69.1", 9, node_id, now=1000.0)
    assert tokens.check(token, "81.2.69.1", 9, node_id, now=1099.0)
    assert tokens.check(token, "81.2.69.1", 9, node_id, now=1150.0)  # the previous epoch
    assert not tokens.check(token, "81.2.69.1", 9, node_id, now=1250.0)  # too old
    assert not tokens.check(token, "81.2.69.1", 10, node_id, now=1000.0)
    assert not tokens.check(token, "81.2.69.2", 9, node_id, now=1000.0)
    assert not tokens.check(token, "81.2.69.1", 9, os.urandom(20), now=1000.0)
    assert not tokens.check("nope", "81.2.69.1", 9, node_id, now=1000.0)


def test_rate_limiter_refills_and_forgets() -> None:
    limiter = RateLimiter(rate=2.0, burst=3.0, max_keys=2)
    assert [limiter.allow("a", now=0.0) for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("a", now=0.5)  # one token back after half a second
    assert not limiter.allow("a", now=0.5)
    limiter.allow("b", now=0.5)
    limiter.allow("c", now=0.5)  # "a" is forgotten: it starts with a full bucket again
    assert [limiter.allow("a", now=0.5) for _ in range(4)] == [True, True, True, False]


def _table(**caps: Any) -> ContactTable:
    config = DHTConfig(admission=AdmissionConfig(**caps))
    return ContactTable(None, config, Node(bytes(20)), SourceGroups(False), lambda coro: None)


def _add(table: ContactTable, ip: str, port: int) -> bool:
    return table.add_verified(Node(os.urandom(20), ip, port), displace=False)


def test_contact_caps_per_address_ip_and_subnet() -> None:
    table = _table(
        max_contacts_per_ip=3, max_contacts_per_subnet=5, max_contacts_per_subnet_in_bucket=20
    )
    added = [_add(table, "93.184.216.1", port) for port in range(1, 8)]
    assert sum(added) == 3  # per IP
    same_subnet = [
        table.add_verified(Node(os.urandom(20), f"93.184.216.{i}", 1), displace=False)
        for i in range(2, 10)
    ]
    assert sum(same_subnet) == 2  # per subnet: 5 in all
    bucketed = _table()  # 2 of a subnet per bucket (one bucket until it holds k contacts)
    tried = [_add(bucketed, f"93.184.217.{i}", 1) for i in range(5)]
    assert sum(tried) == 2
    # one address is one node: a second id there is refused, unless the address answered as it
    first = Node(os.urandom(20), "81.2.69.1", 1)
    assert table.add_verified(first, displace=False)
    second = Node(os.urandom(20), "81.2.69.1", 1)
    assert not table.add_verified(second, displace=False)
    assert table.add_verified(second, displace=True)
    assert table.is_new_node(first) and not table.is_new_node(second)


def test_storage_caps_keys_and_gives_room_to_the_least_represented() -> None:
    stats = StatsCounter()
    store = RecordStorage(DHTConfig(storage=StorageConfig(max_keys=10)), stats)
    for i in range(10):
        assert store.merge(*_record(f"hog/{i}"), source="hog") == 1
    assert store.merge(*_record("hog/10"), source="hog") == 0  # full, and the hog's own
    assert stats.snapshot().dropped["storage_full"] == 1
    assert store.merge(*_record("fair/0", Identity.from_seed(b"f")), source="fair") == 1
    assert stats.snapshot().keys_stored == 10
    assert store.records(_record("hog/0")[0]) == []  # the hog's oldest gave way
    small = RecordStorage(DHTConfig(storage=StorageConfig(max_stored_bytes=4000)), StatsCounter())
    taken = sum(small.merge(*_record(f"k/{i}"), source="one") for i in range(20))
    assert 0 < taken < 20 and small._bytes <= 4000


def test_store_rate_per_source_group() -> None:
    stats = StatsCounter()
    store = RecordStorage(
        DHTConfig(admission=AdmissionConfig(store_rate=0.001, store_burst=5)), stats
    )
    taken = [store.merge(*_record(f"r/{i}"), source="fast") for i in range(8)]
    assert taken == [1] * 5 + [0] * 3
    assert stats.snapshot().dropped["rate_limited"] == 3
    assert store.merge(*_record("r/9"), source="other") == 1  # others are not held back
    assert store.merge(*_record("r/10")) == 1  # nor our own records


def _common_prefix(a: bytes, b: bytes) -> int:
    return 160 - (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).bit_length()


def test_keys_near_returns_the_prefix_block_around_an_id() -> None:
    store = RecordStorage(DHTConfig(), StatsCounter())
    dkeys = []
    for i in range(300):
        dkey, blobs = _record(f"near/{i}")
        store.merge(dkey, blobs)
        dkeys.append(dkey)
    for _ in range(20):
        target = os.urandom(20)
        near = store.keys_near(target, 16)
        assert 1 <= len(near) <= 16
        depth = min(_common_prefix(target, k) for k in near)
        assert set(near) == {k for k in dkeys if _common_prefix(target, k) >= depth}
        wider = [k for k in dkeys if _common_prefix(target, k) >= depth - 1]
        assert depth == 0 or len(wider) > 16


class _Wire:
    """A transport that keeps what the protocol sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def sendto(self, data: bytes, addr: Any) -> None:
        self.sent.append((data, addr))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def _ping(proto: SwarmProtocol, sender: tuple[str, int], node_id: bytes, **meta: Any) -> Response:
    wire: _Wire = proto.transport.inner
    before = len(wire.sent)
    request = encode_request(os.urandom(20), "ping", (node_id,), **meta)
    proto.datagram_received(request, sender)
    assert len(wire.sent) == before + 1
    decoded = decode_datagram(wire.sent[-1][0])
    assert decoded is not None and isinstance(decoded[1], Response)
    return decoded[1]


def test_a_sender_becomes_a_contact_only_by_echoing_its_token() -> None:
    config = DHTConfig()
    stats = StatsCounter()
    proto = SwarmProtocol(Node(os.urandom(20)), RecordStorage(config, stats), config, stats)
    proto.connection_made(_Wire())
    sender, node_id = ("127.0.0.1", 5000), os.urandom(20)
    reply = _ping(proto, sender, node_id, client_only=False, token=None)
    assert reply.token is not None and reply.node_id == proto.source_node.id
    assert proto.router.is_new_node(Node(node_id))  # being sent something proves nothing
    _ping(proto, sender, node_id, client_only=False, token=os.urandom(16))  # a guessed token
    assert proto.router.is_new_node(Node(node_id))
    _ping(proto, ("127.0.0.1", 5001), node_id, client_only=False, token=reply.token)
    assert proto.router.is_new_node(Node(node_id))  # the token is bound to the address
    _ping(proto, sender, node_id, client_only=False, token=reply.token)
    assert not proto.router.is_new_node(Node(node_id))
    # a client-only node gets a token (to prove its address for large replies, issue 25)
    # but never becomes a contact, even echoing it
    client = os.urandom(20)
    token = _ping(proto, ("127.0.0.1", 6000), client, client_only=True, token=None).token
    assert token is not None
    assert _ping(proto, ("127.0.0.1", 6000), client, client_only=True, token=token).token is None
    assert proto.router.is_new_node(Node(client))


def test_requests_beyond_the_rate_get_no_reply() -> None:
    config = DHTConfig(admission=AdmissionConfig(request_rate=0.001, request_burst=3))
    stats = StatsCounter()
    proto = SwarmProtocol(Node(os.urandom(20)), RecordStorage(config, stats), config, stats)
    wire = _Wire()
    proto.connection_made(wire)
    for _ in range(5):
        ping = encode_request(
            os.urandom(20), "ping", (os.urandom(20),), client_only=True, token=None
        )
        proto.datagram_received(ping, ("127.0.0.1", 7000))
    assert len(wire.sent) == 3 and stats.snapshot().requests_rate_limited == 2


def test_wire_decoder_is_strict() -> None:
    good = encode_request(bytes(20), "ping", (bytes(20),), client_only=True, token=b"t")
    decoded = decode_datagram(good)
    assert decoded is not None and decoded[1] == Request("ping", (bytes(20),), True, b"t")
    import umsgpack  # type: ignore[import-untyped]

    for body in (
        ["ping", [bytes(20)]],  # rpcudp's two-element request
        ["ping", [bytes(20)], {"c": 1}],
        ["ping", [bytes(20)], {"x": True}],
        [["ping"], [bytes(20)], {}],
        ["nope", [bytes(20)], {}],
        ["ping", [], {}],
    ):
        assert decode_datagram(b"\x00" + bytes(20) + umsgpack.packb(body)) is None, body
    assert decode_datagram(b"\x01" + bytes(20) + umsgpack.packb([1, {"id": b"short"}])) is None


def test_wire_bytes_are_those_of_umsgpack_and_its_leftovers_are_refused() -> None:
    """The C msgpack packs every datagram exactly as rpcudp's umsgpack did (nodes of either
    version read each other); what umsgpack let through (a body with bytes after it, an
    extension type) is malformed now."""
    import msgpack
    import umsgpack  # type: ignore[import-untyped]

    node_id, token, msg_id = os.urandom(20), os.urandom(16), os.urandom(20)
    contacts = [(os.urandom(20), "127.0.0.1", 40_000 + i) for i in range(20)]
    records = [os.urandom(300), os.urandom(700)]
    for name, args in (
        ("ping", (node_id,)),
        ("find_node", (node_id, os.urandom(20))),
        ("store", (node_id, os.urandom(20), records)),
    ):
        ours = encode_request(msg_id, name, args, client_only=False, token=token)
        theirs = umsgpack.packb([name, list(args), {"c": False, "t": token}])
        assert ours == b"\x00" + msg_id + theirs, name
        assert decode_datagram(ours) is not None
    for value in (contacts, {"value": records}, None, node_id, True, 2**40, -3, 1.5, "x" * 300):
        ours = encode_response(msg_id, value, node_id=node_id, client_only=True, token=token)
        meta = {"id": node_id, "c": True, "t": token}
        assert ours == b"\x01" + msg_id + umsgpack.packb([value, meta]), value
    good = umsgpack.packb(["ping", [node_id], {"c": False}])
    assert decode_datagram(b"\x00" + msg_id + good) is not None
    assert decode_datagram(b"\x00" + msg_id + good + b"\x00") is None  # bytes after the body
    ext = umsgpack.packb(["ping", [node_id, umsgpack.Ext(5, b"x")], {"c": False}])
    assert decode_datagram(b"\x00" + msg_id + ext) is None
    int_key = msgpack.packb(["ping", [node_id], {1: False}])
    assert decode_datagram(b"\x00" + msg_id + int_key) is None
