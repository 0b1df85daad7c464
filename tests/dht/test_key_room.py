"""One host with many ports, or one /48 with many /64s, cannot lock a key (issue 25, item 7):
loopback and private addresses are grouped per host by default (``--private-groups``), and
a full key where every group holds its part gives way from the largest group of groups."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys
import time
from collections.abc import Hashable
from contextlib import AsyncExitStack

import pytest
import trio

from swarm.dht import (
    AdmissionConfig,
    DHTConfig,
    DHTNode,
    Record,
    StorageConfig,
    TimingConfig,
)
from swarm.dht.proofs import ProofCache
from swarm.dht.records import make_record
from swarm.dht.sources import PrivateGroups, SourceGroups, super_group
from swarm.dht.stats import StatsCounter
from swarm.dht.storage import RecordStorage
from swarm.errors import ConfigError
from swarm.identity import Identity

KEY = "room-model/block/0"
DKEY = hashlib.sha1(KEY.encode()).digest()


class ProveAll:
    """Every claim holds: the attackers run real handshake listeners."""

    def claim(self, record: Record) -> Hashable | None:
        addr = record.value.get("addr") if record.value else None
        return (record.peer_id, addr) if isinstance(addr, str) else None

    async def prove(self, claim: Hashable) -> bool:
        await trio.sleep(0)
        return True


def test_private_addresses_group_per_host_by_default() -> None:
    groups = SourceGroups(cap_private=False)
    assert groups.group("127.0.0.1", 4000) == groups.group("127.0.0.1", 4001) == "127.0.0.1"
    assert groups.group("192.168.1.2", 7) != groups.group("192.168.1.3", 7)  # a LAN's machines
    assert groups.group("93.184.216.7", 1) == "93.184.216.0/24"
    assert groups.keys("127.0.0.1", 4000) == ("127.0.0.1:4000", "127.0.0.1:4000")  # routing
    endpoint = SourceGroups(cap_private=False, private=PrivateGroups.ENDPOINT)
    assert endpoint.group("127.0.0.1", 4000) == "127.0.0.1:4000"
    assert endpoint.group("::1", 4000) == "[::1]:4000"
    subnet = SourceGroups(cap_private=False, private=PrivateGroups.SUBNET)
    assert subnet.group("10.1.2.3", 9) == "10.1.2.0/24"
    assert super_group("127.0.0.1:4000") == "127.0.0.1"
    assert super_group("[::1]:4000") == "[::1]"
    assert super_group("93.184.216.0/24") == "93.184.0.0/16"
    assert super_group("2a01:4f8:1:2::/64") == "2a01:4f8:1::/48"
    assert super_group("127.0.0.1") == "127.0.0.0/24"
    endpoint = AdmissionConfig(private_groups="endpoint")  # type: ignore[arg-type]
    assert endpoint.private_groups is PrivateGroups.ENDPOINT
    with pytest.raises(ConfigError, match="private_groups"):
        DHTConfig(admission=AdmissionConfig(private_groups="nope"))  # type: ignore[arg-type]


def _proven_store(max_records: int = 8) -> tuple[RecordStorage, ProofCache]:
    config = DHTConfig(storage=StorageConfig(max_records_per_key=max_records))
    stats = StatsCounter()
    cache = ProofCache(ProveAll(), config, stats)
    return RecordStorage(config, stats, cache), cache


def _blob(identity: Identity, addr: str, ttl: float = 60.0) -> list[bytes]:
    return [make_record(identity, KEY, {"addr": addr}, time.time() + ttl, 1, 1200).encoded]


def _settled(store: RecordStorage, cache: ProofCache, identity: Identity, addr: str) -> None:
    claim = cache.claim(make_record(identity, KEY, {"addr": addr}, time.time() + 60, 1, 1200))
    assert claim is not None
    store.settle(claim, True)


@pytest.mark.parametrize(
    ("attacker_groups", "newcomer_group"),
    [
        ([f"127.0.0.1:{4000 + i}" for i in range(8)], "127.0.0.2:5000"),  # endpoints, one host
        ([f"2a01:4f8:1:{i:x}::/64" for i in range(8)], "2a02:1::/64"),  # /64s of one /48
        ([f"93.184.{i}.0/24" for i in range(8)], "1.2.3.0/24"),  # /24s of one /16
    ],
)
def test_a_full_key_of_many_groups_of_one_party_keeps_room_for_a_newcomer(
    attacker_groups: list[str], newcomer_group: str
) -> None:
    """The class at the storage level: proven records from 8 groups that share one group of
    groups fill the key; a proven newcomer from elsewhere takes the place of one of them."""
    store, cache = _proven_store()
    for i, group in enumerate(attacker_groups):
        sybil = Identity.from_seed(f"sybil{i}".encode())
        _settled(store, cache, sybil, f"6.6.6.{i}:1")
        assert store.merge(DKEY, _blob(sybil, f"6.6.6.{i}:1", ttl=600), source=group) == 1
    newcomer = Identity.from_seed(b"newcomer")
    _settled(store, cache, newcomer, "1.2.3.4:5")
    assert store.merge(DKEY, _blob(newcomer, "1.2.3.4:5"), source=newcomer_group) == 1
    held = {r.peer_id for r in store.records(DKEY)}
    assert newcomer.peer_id in held and len(held) == 8
    # another party as spread out as the newcomer's (its own group of groups) is not evicted
    # by a second newcomer of the same kind: shares are even among groups of groups then
    other = Identity.from_seed(b"other")
    _settled(store, cache, other, "9.9.9.9:5")
    store.merge(DKEY, _blob(other, "9.9.9.9:5"), source="9.9.9.0/24")
    assert newcomer.peer_id in {r.peer_id for r in store.records(DKEY)}


async def test_one_host_with_many_ports_does_not_lock_a_new_server_out() -> None:
    """The break: 39 identities on 39 ports of one host filled every block key on the
    storing nodes (each private endpoint was its own group, so none held two more than a
    newcomer); a new server on another host was absent from every key. In-process nodes
    without a prover (proofs only add a tier above this): the attacker's writers on
    127.0.0.1, the newcomer on 127.0.0.2."""
    config = DHTConfig(timing=TimingConfig(rpc_timeout=0.5, bootstrap_timeout=5.0))
    with trio.fail_after(90):
        async with AsyncExitStack() as stack:
            nodes: list[DHTNode] = []
            for i in range(2):  # two storing nodes, as in the break
                peers = (nodes[0].address,) if nodes else ()
                cfg = dataclasses.replace(config, initial_peers=peers)
                node = DHTNode.open(Identity.from_seed(f"room{i}".encode()), cfg)
                nodes.append(await stack.enter_async_context(node))
            writer = dataclasses.replace(
                config, initial_peers=(nodes[0].address,), client_only=True
            )
            for i in range(config.storage.max_records_per_key):  # one host's ports fill the key
                sybil = Identity.from_seed(f"port-sybil{i}".encode())
                s = await stack.enter_async_context(DHTNode.open(sybil, writer))
                await s.announce(KEY, {"addr": f"127.0.0.1:{20000 + i}"}, config.storage.max_ttl)
            assert len(await nodes[0].get(KEY)) == config.storage.max_records_per_key
            newcomer = Identity.from_seed(b"honest-newcomer")
            elsewhere = dataclasses.replace(writer, host="127.0.0.2")
            me = await stack.enter_async_context(DHTNode.open(newcomer, elsewhere))
            assert await me.announce(KEY, {"addr": "127.0.0.2:30000"}, 60.0) == len(nodes)
            for node in nodes:
                assert newcomer.peer_id in await node.get(KEY)


@pytest.mark.slow
def test_the_cli_takes_private_groups() -> None:
    for command in ("dht", "serve"):
        shown = subprocess.run(
            [sys.executable, "-m", "swarm_cli.main", command, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            env={"COLUMNS": "200", "PATH": ""},
        )
        assert "--private-groups" in shown.stdout, shown.stderr
