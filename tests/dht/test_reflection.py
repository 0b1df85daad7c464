"""DHT reflection (issue 25, item 12): no reply to an address that has not echoed its token
exceeds 3x the request's bytes (RFC 9000 §8.1), so a forged source address cannot turn a
small request into a large reply toward its victim; honest lookups still read full keys
(one extra round trip per storing node and token lifetime). In-process nodes on loopback,
an attacker on a raw UDP socket."""

from __future__ import annotations

import os
import time
from typing import Any

import trio

from swarm.dht import (
    DHTConfig,
    DHTNode,
    TimingConfig,
)
from swarm.dht.protocol import key_digest
from swarm.dht.records import make_record
from swarm.dht.wire import AMPLIFICATION, Response, decode_datagram, encode_request
from swarm.identity import Identity
from swarm.testing.dht import open_dht_cluster

KEY = "reflect-model/block/0"
FAST = DHTConfig(timing=TimingConfig(rpc_timeout=0.5, bootstrap_timeout=5.0))


def _fill(kad: Any, records: int = 40) -> int:
    """A full key: ``records`` signers' records of ~150 bytes each."""
    expires = time.time() + 300
    for i in range(records):
        writer = Identity.from_seed(f"writer{i}".encode())
        record = make_record(writer, KEY, {"addr": "10.0.0.1:1", "pad": "x" * 60}, expires, 1, 1200)
        kad.storage.merge(key_digest(KEY), [record.encoded], source=f"g{i}")
    return len(kad.storage.records(key_digest(KEY)))


async def _ask(sock: Any, port: int, request: bytes) -> list[bytes]:
    """Send ``request`` and collect every datagram that comes back within 0.3 s."""
    await sock.sendto(request, ("127.0.0.1", port))
    replies = []
    with trio.move_on_after(0.3):
        while True:
            replies.append(await sock.recv(65536))
    return replies


async def test_a_small_request_draws_no_large_reply_to_an_unproven_address() -> None:
    """The break: an 82-byte find_value for a full key drew a 7,603-byte reply (x93)."""
    async with DHTNode.open(Identity.from_seed(b"store"), FAST) as node:
        assert await node.run_on_loop(_fill) == 40
        with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
            await sock.bind(("127.0.0.1", 0))
            asker = os.urandom(20)
            worst = 0.0
            for name, args in (
                ("find_value", (asker, key_digest(KEY))),
                ("find_node", (asker, os.urandom(20))),
                ("ping", (asker,)),
            ):
                for client_only in (True, False):
                    request = encode_request(
                        os.urandom(20), name, args, client_only=client_only, token=None
                    )
                    replies = await _ask(sock, node.port, request)
                    assert len(replies) == 1
                    worst = max(worst, len(replies[0]) / len(request))
            assert worst <= AMPLIFICATION, worst
            # echoing the token it was handed, the same asker gets the whole key
            request = encode_request(
                os.urandom(20), "find_value", (asker, key_digest(KEY)), client_only=True, token=None
            )
            reply = decode_datagram((await _ask(sock, node.port, request))[0])
            assert reply is not None and isinstance(reply[1], Response)
            assert reply[1].retry and reply[1].value is None and reply[1].token is not None
            proven = encode_request(
                os.urandom(20),
                "find_value",
                (asker, key_digest(KEY)),
                client_only=True,
                token=reply[1].token,
            )
            whole = decode_datagram((await _ask(sock, node.port, proven))[0])
            assert whole is not None and isinstance(whole[1], Response)
            assert len(whole[1].value["value"]) == 40
        assert node.statistics().replies_need_token >= 2


async def test_forged_sources_from_many_ports_are_each_held_to_three_times() -> None:
    """The class: 50 unproven source ports (as a forged-address flood would look) asking for
    the full key, padded or not, with guessed tokens: every reply within 3x its request."""
    async with DHTNode.open(Identity.from_seed(b"store"), FAST) as node:
        await node.run_on_loop(_fill)
        exchanges: list[tuple[bytes, list[bytes]]] = []

        async def ask_from_a_port_of_its_own(i: int) -> None:
            with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
                await sock.bind(("127.0.0.1", 0))
                request = encode_request(
                    os.urandom(20),
                    "find_value",
                    (os.urandom(20), key_digest(KEY)),
                    client_only=bool(i % 2),
                    token=os.urandom(16) if i % 3 == 0 else None,
                    pad=i % 5 == 0,
                )
                exchanges.append((request, await _ask(sock, node.port, request)))

        # all at once, as a flood would come (and one 0.3 s listening window, not 50)
        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(ask_from_a_port_of_its_own, i)
        assert len(exchanges) == 50
        for request, replies in exchanges:
            assert replies, "a request drew no reply at all (the bound would hold vacuously)"
            assert all(len(r) <= AMPLIFICATION * len(request) for r in replies)
        sent = sum(len(request) for request, _ in exchanges)
        got = sum(len(r) for _, replies in exchanges for r in replies)
        assert got <= AMPLIFICATION * sent


async def test_lookups_still_read_full_keys_and_count_their_datagrams() -> None:
    """Honest gets work (the join's reply already hands the reader a token for the node it
    joined through; others need one repeat each, once); a second get costs no repeats."""
    with trio.fail_after(60):
        async with open_dht_cluster(6, FAST, seed="reflect") as cluster:
            for node in cluster.nodes:
                await node.run_on_loop(_fill)
            client_cfg = DHTConfig(
                client_only=True,
                initial_peers=(cluster.nodes[0].address,),
                timing=TimingConfig(rpc_timeout=0.5, bootstrap_timeout=5.0),
            )
            async with DHTNode.open(Identity.from_seed(b"reader"), client_cfg) as reader:
                first = reader.statistics()
                assert len(await reader.get(KEY)) == 40
                second = reader.statistics()
                assert len(await reader.get(KEY)) == 40
                third = reader.statistics()
            assert third.requests_repeated_with_token == second.requests_repeated_with_token
            assert third.datagrams_sent - second.datagrams_sent <= (
                second.datagrams_sent - first.datagrams_sent
            )
