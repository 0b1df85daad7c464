"""Records, storage, config and datagram sealing, without a network."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import msgpack
import pytest

from swarm.dht import (
    DHTConfig,
    StorageConfig,
)
from swarm.dht.datagrams import DatagramSeal
from swarm.dht.records import DropReason, Record, VerifiedRecords, check_record, make_record
from swarm.dht.stats import StatsCounter
from swarm.dht.storage import RecordStorage
from swarm.errors import ConfigError, RecordError
from swarm.identity import Identity

ALICE = Identity.from_seed(b"alice")
MALLORY = Identity.from_seed(b"mallory")
KEY = "model-abc/block/3"
LIMITS = {"max_bytes": 1200, "max_ttl": 3600.0, "clock_skew": 30.0}


def sign(
    identity: Identity = ALICE, key: str = KEY, ttl: float = 60.0, seq: int = 1, **value: object
) -> Record:
    return make_record(identity, key, value or {"addr": "1.2.3.4:5"}, time.time() + ttl, seq, 1200)


def check(blob: object, key: str | None = KEY) -> Record | DropReason:
    return check_record(blob, key, now=time.time(), **LIMITS)  # type: ignore[arg-type]


def refield(record: Record, index: int, value: object) -> bytes:
    fields = msgpack.unpackb(record.encoded)
    fields[index] = value
    return msgpack.packb(fields)


def test_a_signed_record_checks_out() -> None:
    record = sign(throughput=12.5)
    got = check(record.encoded)
    assert isinstance(got, Record)
    assert got.peer_id == ALICE.peer_id and got.seq == 1
    assert got.value == {"throughput": 12.5}


def test_each_forgery_is_named() -> None:
    record = sign()
    other = sign(MALLORY)
    forged_sig = refield(record, 7, bytes(64))
    tampered_value = refield(record, 4, msgpack.packb({"addr": "6.6.6.6:6"}))
    tampered_expiry = refield(record, 5, record.expires_at + 3000.0)
    tampered_seq = refield(record, 6, 99)
    # Mallory's key, Alice's id: the subkey is not the signer
    subkey_lie = refield(other, 3, ALICE.peer_id.digest)
    assert check(forged_sig) is DropReason.BAD_SIGNATURE
    assert check(tampered_value) is DropReason.BAD_SIGNATURE
    assert check(tampered_expiry) is DropReason.BAD_SIGNATURE
    assert check(tampered_seq) is DropReason.BAD_SIGNATURE
    assert check(subkey_lie) is DropReason.SUBKEY_MISMATCH
    assert check(record.encoded, "other/key") is DropReason.WRONG_KEY
    assert check(sign(ttl=-1.0).encoded) is DropReason.EXPIRED
    assert check(sign(ttl=10_000.0).encoded) is DropReason.TTL_TOO_LONG
    assert check(b"\x93\x01\x02") is DropReason.MALFORMED
    assert check(refield(record, 5, float("nan"))) is DropReason.MALFORMED
    assert check(refield(record, 4, msgpack.packb([1, 2]))) is DropReason.MALFORMED
    assert check("not bytes") is DropReason.MALFORMED
    assert check(b"\x00" * 5000) is DropReason.TOO_LARGE


def test_verified_bytes_are_not_verified_again_and_no_forgery_passes_for_them() -> None:
    verified = VerifiedRecords(capacity=4)
    record = sign()

    def cached(blob: object, key: str | None = KEY, now: float | None = None) -> object:
        now = time.time() if now is None else now
        return check_record(blob, key, now=now, verified=verified, **LIMITS)  # type: ignore[arg-type]

    assert isinstance(cached(record.encoded), Record)
    assert isinstance(cached(record.encoded), Record)
    assert (verified.verified, verified.hits) == (1, 1)
    # every byte the signature covers, and the signature itself, keys the cache: a forgery
    # of the record just verified is verified afresh and dropped
    other = sign(MALLORY)
    assert isinstance(cached(other.encoded), Record)
    assert cached(refield(record, 7, bytes(64))) is DropReason.BAD_SIGNATURE
    assert (
        cached(refield(record, 4, msgpack.packb({"addr": "6.6.6.6:6"}))) is DropReason.BAD_SIGNATURE
    )
    assert cached(refield(record, 5, record.expires_at + 3000.0)) is DropReason.BAD_SIGNATURE
    assert cached(refield(record, 6, 99)) is DropReason.BAD_SIGNATURE
    assert cached(refield(other, 3, ALICE.peer_id.digest)) is DropReason.SUBKEY_MISMATCH
    assert cached(refield(record, 7, bytes(64))) is DropReason.BAD_SIGNATURE  # not remembered
    assert len(verified) == 2
    # what depends on the moment or on the key asked for is checked every time
    assert cached(record.encoded, "other/key") is DropReason.WRONG_KEY
    assert cached(record.encoded, now=record.expires_at + 1) is DropReason.EXPIRED
    # bounded: the least recently seen digests go
    for seq in range(2, 8):
        assert isinstance(cached(sign(seq=seq).encoded), Record)
    assert len(verified) == 4
    before = verified.verified
    assert isinstance(cached(record.encoded), Record)
    assert verified.verified == before + 1


def test_a_record_too_large_is_refused_with_a_clear_error() -> None:
    with pytest.raises(RecordError, match=r"at most 1200 bytes .*max_record_bytes"):
        sign(blob="x" * 2000)
    with pytest.raises(RecordError, match="msgpack"):
        sign(bad=object())


def storage(**limits: Any) -> tuple[RecordStorage, StatsCounter]:
    stats = StatsCounter()
    return RecordStorage(DHTConfig(storage=StorageConfig(**limits)), stats), stats


DKEY = hashlib.sha1(KEY.encode()).digest()


def test_storage_merges_writers_and_drops_older_seq() -> None:
    store, stats = storage()
    assert store.merge(DKEY, [sign(seq=5).encoded, sign(MALLORY, seq=1).encoded]) == 2
    assert store.merge(DKEY, [sign(seq=4).encoded]) == 0
    held = {r.peer_id: r.seq for r in store.records(DKEY)}
    assert held == {ALICE.peer_id: 5, MALLORY.peer_id: 1}
    assert stats.snapshot().dropped == {"stale_seq": 1}
    assert store.merge(hashlib.sha1(b"other").digest(), [sign().encoded]) == 0
    assert stats.snapshot().dropped["wrong_key"] == 1
    assert store.merge(DKEY, "not a list") == 0


def test_republishing_never_extends_life() -> None:
    store, _ = storage()
    record = sign(ttl=5.0)
    store.merge(DKEY, [record.encoded])
    # the same bytes again (any node's republish) keep the signed expiry
    store.merge(DKEY, [record.encoded])
    assert store.records(DKEY)[0].expires_at == record.expires_at
    assert store.records(DKEY, now=record.expires_at + 0.01) == []
    assert store.get(DKEY) is None


def test_a_full_key_keeps_incumbents_and_takes_from_the_largest_group() -> None:
    store, stats = storage(max_records_per_key=4)
    writers = [Identity.from_seed(f"w{i}".encode()) for i in range(6)]
    blobs = [sign(w, ttl=60.0 + 100 * i).encoded for i, w in enumerate(writers)]
    store.merge(DKEY, blobs[:1], source="honest")
    store.merge(DKEY, blobs[1:5], source="sybils")  # three fit; the fourth finds it full
    held = {r.peer_id for r in store.records(DKEY)}
    assert held == {w.peer_id for w in writers[:4]}
    assert stats.snapshot().dropped["key_full"] == 1
    # a newcomer from a third group takes a place of the group holding the most; the one it
    # gives up is the latest-expiring (expiry never buys a place)
    store.merge(DKEY, blobs[5:], source="other")
    held = {r.peer_id for r in store.records(DKEY)}
    assert held == {writers[0].peer_id, writers[1].peer_id, writers[2].peer_id, writers[5].peer_id}
    assert stats.snapshot().dropped["evicted"] == 1
    # the sybils' group now holds 2, the others 1 each: no one else can be pushed out
    late = sign(Identity.from_seed(b"late")).encoded
    assert store.merge(DKEY, [late], source="sybils") == 0


def test_config_refuses_what_cannot_work() -> None:
    with pytest.raises(ConfigError, match="host:port"):
        DHTConfig(initial_peers=("nohost",))
    with pytest.raises(ConfigError, match="datagram"):
        DHTConfig(storage=StorageConfig(max_records_per_key=100, max_record_bytes=7000))
    with pytest.raises(ConfigError, match="swarm key"):
        DHTConfig(swarm_key=b"short")


def test_sealed_datagrams_open_only_with_the_same_key() -> None:
    seal, other = DatagramSeal(b"k" * 32), DatagramSeal(b"j" * 32)
    sealed = seal.seal(b"hello")
    assert b"hello" not in sealed
    assert seal.open(sealed) == b"hello"
    assert other.open(sealed) is None
    assert seal.open(sealed[:-1] + bytes([sealed[-1] ^ 1])) is None
    assert seal.open(b"short") is None
