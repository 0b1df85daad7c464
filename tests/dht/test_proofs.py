"""Proven records (`swarm.dht.proofs`) with a fake prover: kept before unproven ones."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Hashable
from contextlib import AsyncExitStack

import trio

from swarm.dht import (
    AdmissionConfig,
    DHTConfig,
    DHTNode,
    ProofConfig,
    Record,
    StorageConfig,
    TimingConfig,
)
from swarm.dht.proofs import ProofCache, run_proofs
from swarm.dht.records import make_record
from swarm.dht.stats import StatsCounter
from swarm.dht.storage import RecordStorage
from swarm.identity import Identity
from swarm.types import PeerId

KEY = "proof-model/block/0"
DKEY = hashlib.sha1(KEY.encode()).digest()


class FakeProver:
    """Proves the claims of the peers in ``honest``; a claim is (peer id, announced addr)."""

    def __init__(self, honest: set[PeerId]) -> None:
        self.honest = honest
        self.asked: list[Hashable] = []

    def claim(self, record: Record) -> Hashable | None:
        addr = record.value.get("addr") if record.value else None
        return (record.peer_id, addr) if isinstance(addr, str) else None

    async def prove(self, claim: Hashable) -> bool:
        self.asked.append(claim)
        await trio.sleep(0)
        return isinstance(claim, tuple) and claim[0] in self.honest


def _blob(identity: Identity, seq: int = 1, **value: object) -> list[bytes]:
    return [make_record(identity, KEY, value, time.time() + 60, seq, 1200).encoded]


def test_a_proven_record_takes_the_place_of_an_unproven_one() -> None:
    config = DHTConfig(storage=StorageConfig(max_records_per_key=4))
    server = Identity.from_seed(b"server")
    prover = FakeProver({server.peer_id})
    stats = StatsCounter()
    cache = ProofCache(prover, config, stats)
    submitted: list[Hashable] = []
    cache.submit = lambda claim, group: submitted.append(claim)
    store = RecordStorage(config, stats, cache)
    sybils = [Identity.from_seed(f"s{i}".encode()) for i in range(6)]
    for i, sybil in enumerate(sybils[:4]):  # four groups of one: fair shares, key full
        assert store.merge(DKEY, _blob(sybil, addr=f"6.6.6.{i}:1"), source=f"g{i}") == 1
    assert store.merge(DKEY, _blob(server, addr="1.2.3.4:5"), source="server") == 0
    assert (server.peer_id, "1.2.3.4:5") in submitted  # refused, but its claim is proven
    store.settle((server.peer_id, "1.2.3.4:5"), True)
    assert store.merge(DKEY, _blob(server, seq=2, addr="1.2.3.4:5"), source="server") == 1
    held = {r.peer_id for r in store.records(DKEY)}
    assert server.peer_id in held and len(held) == 4
    # unproven newcomers never push a proven record out, whatever their group
    for i, sybil in enumerate(sybils[4:]):
        store.merge(DKEY, _blob(sybil, addr="6.6.6.9:1"), source=f"new{i}")
    assert server.peer_id in {r.peer_id for r in store.records(DKEY)}
    assert len(submitted) == len(set(submitted))  # each claim asked for once


async def test_a_server_proves_its_way_into_a_key_full_of_sybils() -> None:
    config = DHTConfig(
        storage=StorageConfig(max_records_per_key=8),
        timing=TimingConfig(rpc_timeout=0.5, bootstrap_timeout=5.0),
    )
    server = Identity.from_seed(b"proven-server")
    prover = FakeProver({server.peer_id})
    with trio.fail_after(60):
        async with AsyncExitStack() as stack:
            nodes: list[DHTNode] = []
            for i in range(6):  # storing nodes, each with the prover
                peers = (nodes[0].address,) if nodes else ()
                cfg = dataclasses.replace(config, initial_peers=peers)
                node = DHTNode.open(Identity.from_seed(f"store{i}".encode()), cfg, prover=prover)
                nodes.append(await stack.enter_async_context(node))
            joined = dataclasses.replace(config, initial_peers=(nodes[0].address,))
            writer = dataclasses.replace(joined, client_only=True)
            for i in range(8):  # eight sybils, each its own endpoint (group): a full key
                sybil = Identity.from_seed(f"sybil{i}".encode())
                s = await stack.enter_async_context(DHTNode.open(sybil, writer))
                await s.announce(KEY, {"addr": f"6.6.6.{i}:1"}, config.storage.max_ttl)
            me = await stack.enter_async_context(DHTNode.open(server, writer))
            assert await me.announce(KEY, {"addr": me.address}, 60.0) == 0  # full everywhere
            while sum(n.statistics().proofs_passed for n in nodes) < len(nodes):
                await trio.sleep(0.02)
            assert await me.announce(KEY, {"addr": me.address}, 60.0) == len(nodes)
            assert server.peer_id in await nodes[5].get(KEY)
            assert sum(n.statistics().proofs_failed for n in nodes) >= 8


class SilentProver(FakeProver):
    """Claims of the peers not in ``honest`` name silent listeners: their proofs hang until
    the proof timeout."""

    async def prove(self, claim: Hashable) -> bool:
        self.asked.append(claim)
        if isinstance(claim, tuple) and claim[0] in self.honest:
            return True
        await trio.sleep_forever()
        return False


async def _flood_then_newcomer(groups: int, per_group: int) -> tuple[float, int]:
    """``groups`` x ``per_group`` forged records (each a fresh identity naming a silent
    listener) reach a storing node, then one honest newcomer's record from its own group:
    (seconds until the newcomer is proven, records held while its proof waited)."""
    config = DHTConfig(
        proofs=ProofConfig(timeout=0.2, concurrency=2, rate=50.0),
        admission=AdmissionConfig(store_burst=10_000),
    )
    newcomer = Identity.from_seed(b"newcomer")
    prover = SilentProver({newcomer.peer_id})
    stats = StatsCounter()
    cache = ProofCache(prover, config, stats)
    store = RecordStorage(config, stats, cache)
    send, receive = trio.open_memory_channel[tuple[Hashable, str]](100_000)
    cache.submit = lambda claim, group: send.send_nowait((claim, group))

    async def settle(claim: Hashable, ok: bool) -> None:
        store.settle(claim, ok)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_proofs, prover, config, receive, settle, stats)
        for g in range(groups):
            for i in range(per_group):
                sybil = Identity.from_seed(f"forged-{g}-{i}".encode())
                key = f"proof-model/block/{(g * per_group + i) % 6}"
                record = make_record(
                    sybil, key, {"addr": f"6.6.{g}.{i}:1"}, time.time() + 60, 1, 1200
                )
                store.merge(hashlib.sha1(key.encode()).digest(), [record.encoded], f"g{g}")
        await trio.sleep(0.1)  # the flood's proofs are under way
        started = trio.current_time()
        assert store.merge(DKEY, _blob(newcomer, addr="1.2.3.4:5"), source="newcomer") == 1
        held = len(store.records(DKEY))  # stored and served, unproven, while its proof waits
        claim = (newcomer.peer_id, "1.2.3.4:5")
        with trio.move_on_after(20):
            while not cache.proven(claim, "newcomer"):
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    return trio.current_time() - started, held


async def test_a_proof_flood_from_one_group_does_not_starve_a_newcomer() -> None:
    """The break: 300 forged records filled the 256-claim queue; a new server's claim was
    dropped and not proven within 90 s."""
    waited, held = await _flood_then_newcomer(groups=1, per_group=300)
    assert waited < 1.0, waited  # at most one proof of the flood's group goes first
    assert held >= 1


async def test_a_proof_flood_from_many_groups_does_not_starve_a_newcomer() -> None:
    """The class: 20 groups x 20 forged records (400, more than the old 256-claim queue);
    the newcomer's claim is queued and waits at most one round over the groups (20 proofs
    of 0.2 s, two at a time: 2 s)."""
    waited, _ = await _flood_then_newcomer(groups=20, per_group=20)
    assert waited < 3.5, waited
