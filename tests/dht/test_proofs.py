"""Proven records (`swarm.dht.proofs`) with a fake prover: kept before unproven ones."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Hashable
from contextlib import AsyncExitStack

import trio

from swarm.dht import DHTConfig, DHTNode, Record
from swarm.dht.proofs import ProofCache
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
    config = DHTConfig(max_records_per_key=4)
    server = Identity.from_seed(b"server")
    prover = FakeProver({server.peer_id})
    stats = StatsCounter()
    cache = ProofCache(prover, config, stats)
    submitted: list[Hashable] = []
    cache.submit = submitted.append
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
    config = DHTConfig(max_records_per_key=8, rpc_timeout=0.5, bootstrap_timeout=5.0)
    server = Identity.from_seed(b"proven-server")
    prover = FakeProver({server.peer_id})
    with trio.fail_after(60):
        async with AsyncExitStack() as stack:
            nodes: list[DHTNode] = []
            for i in range(6):  # storing nodes, each with the prover
                peers = (nodes[0].address,) if nodes else ()
                cfg = DHTConfig(**{**config.__dict__, "initial_peers": peers})
                node = DHTNode.open(Identity.from_seed(f"store{i}".encode()), cfg, prover=prover)
                nodes.append(await stack.enter_async_context(node))
            joined = DHTConfig(**{**config.__dict__, "initial_peers": (nodes[0].address,)})
            writer = DHTConfig(**{**joined.__dict__, "client_only": True})
            for i in range(8):  # eight sybils, each its own endpoint (group): a full key
                sybil = Identity.from_seed(f"sybil{i}".encode())
                s = await stack.enter_async_context(DHTNode.open(sybil, writer))
                await s.announce(KEY, {"addr": f"6.6.6.{i}:1"}, config.max_ttl)
            me = await stack.enter_async_context(DHTNode.open(server, writer))
            assert await me.announce(KEY, {"addr": me.address}, 60.0) == 0  # full everywhere
            while sum(n.statistics().proofs_passed for n in nodes) < len(nodes):
                await trio.sleep(0.02)
            assert await me.announce(KEY, {"addr": me.address}, 60.0) == len(nodes)
            assert server.peer_id in await nodes[5].get(KEY)
            assert sum(n.statistics().proofs_failed for n in nodes) >= 8
