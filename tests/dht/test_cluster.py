"""Many DHT nodes in one process, on real UDP sockets bound to 127.0.0.1 port 0."""

from __future__ import annotations

import asyncio
import time

import msgpack
import pytest
import trio

from swarm.dht import (
    DHTConfig,
    TimingConfig,
)
from swarm.dht.kademlia_node import stored
from swarm.dht.protocol import key_digest
from swarm.dht.records import Record, make_record
from swarm.errors import RecordError
from swarm.identity import Identity
from swarm.testing.dht import open_dht_cluster

FAST = DHTConfig(timing=TimingConfig(rpc_timeout=0.5, bootstrap_timeout=5.0))
# where no node goes away a timeout is only a ceiling: a generous one costs nothing, and
# keeps a loaded machine (the nodes' shared loop thread waits for the CPU) from losing
# live contacts to it
STEADY = DHTConfig(timing=TimingConfig(rpc_timeout=3.0, bootstrap_timeout=15.0))
KEYS = [f"model-x/block/{i}" for i in range(12)]


@pytest.mark.slow  # 30 nodes on real UDP round trips
async def test_thirty_nodes_ten_writers_twelve_keys() -> None:
    with trio.fail_after(120):
        async with open_dht_cluster(30, STEADY) as cluster:
            writers = cluster.nodes[:10]
            async with trio.open_nursery() as nursery:
                for w in writers:
                    for key in KEYS:
                        nursery.start_soon(w.announce, key, {"addr": w.address}, 30.0)
            for reader in cluster.nodes:
                found = await reader.get_many(KEYS)
                for key in KEYS:
                    assert set(found[key]) == {w.peer_id for w in writers}, (reader, key)
                    for pid, record in found[key].items():
                        assert record.peer_id == pid and record.key == key
            assert sum(n.statistics().dropped_total() for n in cluster.nodes) == 0


@pytest.mark.slow  # waits for real TTLs
async def test_short_ttl_expires_and_reannouncing_keeps_records() -> None:
    ttl = 1.5
    with trio.fail_after(30):
        async with open_dht_cluster(8, FAST) as cluster:
            keeper, leaver, reader = cluster.nodes[1], cluster.nodes[2], cluster.nodes[7]
            await keeper.announce("k", {"who": "keeper"}, ttl)
            await leaver.announce("k", {"who": "leaver"}, ttl)
            first = await reader.get("k")
            assert set(first) == {keeper.peer_id, leaver.peer_id}
            deadline = first[leaver.peer_id].expires_at
            while time.time() < deadline + 0.2:  # keeper re-announces every TTL/2
                await keeper.announce("k", {"who": "keeper"}, ttl)
                await trio.sleep(ttl / 2)
            later = await reader.get("k")
            assert set(later) == {keeper.peer_id}
            assert later[keeper.peer_id].seq > first[keeper.peer_id].seq
            # nothing left on any storing node either once the keeper's record lapses
            await trio.sleep(later[keeper.peer_id].expires_at - time.time() + 0.1)
            assert await reader.get("k") == {}
            for node in cluster.nodes:
                held = await node.run_on_loop(lambda kad: kad.storage.records(key_digest("k")))
                assert held == []


async def test_retract_hides_our_record() -> None:
    with trio.fail_after(20):
        async with open_dht_cluster(6, FAST) as cluster:
            a, b = cluster.nodes[1], cluster.nodes[2]
            await a.announce("k", {"x": 1}, 30.0)
            await b.announce("k", {"x": 2}, 30.0)
            await a.retract("k")
            assert set(await cluster.nodes[5].get("k")) == {b.peer_id}
            assert await a.retract("never-announced") == 0


@pytest.mark.slow  # waits out real RPC timeouts
async def test_stopping_a_third_leaves_live_records_readable() -> None:
    with trio.fail_after(60):
        async with open_dht_cluster(30, FAST) as cluster:
            for w in cluster.nodes[:10]:
                for key in KEYS[:4]:
                    await w.announce(key, {"addr": w.address}, 60.0)
            for index in range(20, 30):
                await cluster.stop(index)
            await cluster.stop(5)  # writers leave too; their records stay until expiry
            for index in range(11, 20):
                await cluster.stop(index)
            expected = {n.peer_id for n in cluster.nodes[:10]}
            results = {}

            async def read(index: int) -> None:
                results[index] = await cluster.nodes[index].get_many(KEYS[:4])

            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    for index in range(30):
                        if index not in cluster.stopped:
                            nursery.start_soon(read, index)
            assert len(results) == 10
            for index, found in results.items():
                for key in KEYS[:4]:
                    assert set(found[key]) == expected, (index, key)


async def test_forged_records_are_rejected_by_storing_nodes_and_readers() -> None:
    mallory, alice = Identity.from_seed(b"mallory"), Identity.from_seed(b"alice")
    key = "model-x/block/0"
    good = make_record(alice, key, {"a": 1}, time.time() + 60, 1, 1200)
    fields = msgpack.unpackb(good.encoded)
    forged = {
        "bad_signature": _with(fields, 7, bytes(64)),
        "tampered": _with(fields, 4, msgpack.packb({"a": 2})),
        "subkey_mismatch": _with(
            msgpack.unpackb(make_record(mallory, key, {}, time.time() + 60, 1, 1200).encoded),
            3,
            alice.peer_id.digest,
        ),
        "expired": make_record(alice, key, {}, time.time() - 1, 2, 1200).encoded,
        "wrong_key": make_record(alice, "other", {}, time.time() + 60, 3, 1200).encoded,
    }
    with trio.fail_after(30):
        async with open_dht_cluster(6, FAST) as cluster:
            sender, target, reader = cluster.nodes[1], cluster.nodes[2], cluster.nodes[3]
            target_addr = (await target.run_on_loop(lambda kad: kad.node.id), target.port)
            dkey = key_digest(key)

            async def send(kad: object, blob: bytes) -> bool:
                from kademlia.node import Node

                node = Node(target_addr[0], "127.0.0.1", target_addr[1])
                return await kad.protocol.store_records(node, dkey, [blob])  # type: ignore[attr-defined,no-any-return]

            for blob in forged.values():
                ok = await sender._runner.run(lambda b=blob: send(sender._kad, b))
                assert ok is False
            dropped = target.statistics().dropped
            assert dropped["bad_signature"] == 2 and dropped["subkey_mismatch"] == 1
            assert dropped["expired"] == 1 and dropped["wrong_key"] == 1
            assert await target.run_on_loop(lambda kad: kad.storage.records(dkey)) == []

            # a lying storing node serves forged records straight from its storage
            for node in cluster.nodes:
                for i, blob in enumerate(forged.values()):
                    fake_id = Identity.from_seed(f"fake{i}".encode()).peer_id
                    fake = Record(key, fake_id, b"", {}, time.time() + 60, i, blob)
                    await node.run_on_loop(lambda kad, f=fake: kad.storage.put_unchecked(dkey, f))
            assert await reader.get(key) == {}
            seen = reader.statistics().dropped
            assert seen["bad_signature"] >= 2 and seen["subkey_mismatch"] >= 1
            assert seen["expired"] >= 1 and seen["wrong_key"] >= 1


def _with(fields: list[object], index: int, value: object) -> bytes:
    copy = list(fields)
    copy[index] = value
    return msgpack.packb(copy)  # type: ignore[no-any-return]


async def test_a_record_too_large_for_a_datagram_is_refused() -> None:
    async with open_dht_cluster(2, FAST) as cluster:
        with pytest.raises(RecordError, match="at most 1200 bytes"):
            await cluster.nodes[1].announce("k", {"blob": b"x" * 5000}, 10.0)
        with pytest.raises(RecordError, match="ttl"):
            await cluster.nodes[1].announce("k", {}, 10**9)


async def test_a_reader_verifies_a_record_it_saw_before_only_once() -> None:
    with trio.fail_after(30):
        async with open_dht_cluster(4, STEADY) as cluster:
            writer, reader = cluster.nodes[0], cluster.nodes[3]
            await writer.announce(KEYS[0], {"addr": writer.address}, 30.0)
            assert set(await reader.get(KEYS[0])) == {writer.peer_id}
            first = reader.statistics()
            assert first.signatures_verified >= 1
            assert set(await reader.get(KEYS[0])) == {writer.peer_id}
            again = reader.statistics()
            assert again.signatures_verified == first.signatures_verified
            assert again.signatures_cached > first.signatures_cached


def test_a_store_does_not_wait_out_nodes_that_never_answer() -> None:
    # ten nodes were sent the record: seven took it, one refused it, two (gone) never
    # answer. The store returns without their RPC timeouts, counting what answered; stores
    # answered within the tail still count
    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        answers: list[asyncio.Future[bool]] = [loop.create_future() for _ in range(10)]
        for answer in answers[:7]:
            answer.set_result(True)
        answers[7].set_result(False)
        silent = await asyncio.wait_for(stored(answers), timeout=30)
        late: list[asyncio.Future[bool]] = [loop.create_future() for _ in range(10)]
        for answer in late[:8]:
            answer.set_result(True)
        for answer in late[8:]:
            loop.call_later(0.05, answer.set_result, True)
        return silent, await asyncio.wait_for(stored(late), timeout=30)

    assert asyncio.run(main()) == (7, 10)
