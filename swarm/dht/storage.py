"""What a DHT node holds: for each key digest, at most N verified records merged by subkey.

Replaces kademlia's ``ForgetfulStorage``, which keeps one value per key (last writer wins)
for a week and hands every value to the hourly republish. Here a store merges records by
the announcing peer, a record only replaces that peer's record with a higher ``seq``, expired
records vanish, and nothing is republished by storing nodes: announcing peers re-announce.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from typing import Any

from kademlia.storage import IStorage

from swarm.dht.config import DHTConfig
from swarm.dht.records import DropReason, Record, check_record
from swarm.dht.stats import StatsCounter

__all__ = ["RecordStorage"]


class RecordStorage(IStorage):  # type: ignore[misc]
    """Records by key digest (SHA-1 of the text key, kademlia's key space) and signer.

    Values going in and out (the kademlia ``IStorage`` interface) are lists of encoded
    records. Every record is checked with `check_record` and must be bound to a key whose
    SHA-1 is the digest it is stored under. Only the DHT loop thread touches an instance.
    """

    def __init__(self, config: DHTConfig, stats: StatsCounter) -> None:
        self._config = config
        self._stats = stats
        self._data: dict[bytes, dict[bytes, Record]] = {}

    def merge(self, dkey: bytes, blobs: object, now: float | None = None) -> int:
        """Check and merge a peer's list of encoded records; returns how many are now held
        (newly taken, or identical to the one held).

        Rejected records are counted by reason; never raises on peer input.
        """
        if not isinstance(blobs, list) or len(blobs) > self._config.max_records_per_key:
            self._stats.drop(DropReason.MALFORMED)
            return 0
        now = time.time() if now is None else now
        slot = self._data.setdefault(dkey, {})
        taken = 0
        for blob in blobs:
            record = self._check(dkey, blob, now)
            if record is None:
                continue
            held = slot.get(record.peer_id.digest)
            if held is not None and held.seq >= record.seq:
                if held.encoded == record.encoded:
                    taken += 1
                else:
                    self._stats.drop(DropReason.STALE_SEQ)
                continue
            slot[record.peer_id.digest] = record
            taken += 1
        self._trim(dkey, slot, now)
        return taken

    def _check(self, dkey: bytes, blob: object, now: float) -> Record | None:
        cfg = self._config
        result = check_record(
            blob,
            None,
            now=now,
            max_bytes=cfg.max_record_bytes,
            max_ttl=cfg.max_ttl,
            clock_skew=cfg.clock_skew,
        )
        if isinstance(result, DropReason):
            self._stats.drop(result)
            return None
        if hashlib.sha1(result.key.encode("utf-8")).digest() != dkey:
            self._stats.drop(DropReason.WRONG_KEY)
            return None
        return result

    def _trim(self, dkey: bytes, slot: dict[bytes, Record], now: float) -> None:
        for subkey in [s for s, r in slot.items() if r.expired(now)]:
            del slot[subkey]
        excess = len(slot) - self._config.max_records_per_key
        if excess > 0:
            # keep the freshest: the latest expiry, then the highest sequence number
            ranked = sorted(slot.items(), key=lambda item: (item[1].expires_at, item[1].seq))
            for subkey, _ in ranked[:excess]:
                del slot[subkey]
            self._stats.drop(DropReason.EVICTED, excess)
        if not slot:
            del self._data[dkey]
        self._update_gauges()

    def _update_gauges(self) -> None:
        self._stats.gauge("keys_stored", len(self._data))
        self._stats.gauge("records_stored", sum(len(s) for s in self._data.values()))

    def records(self, dkey: bytes, now: float | None = None) -> list[Record]:
        """The live records held under a key digest (expired ones are removed)."""
        slot = self._data.get(dkey)
        if slot is None:
            return []
        self._trim(dkey, slot, time.time() if now is None else now)
        return list(slot.values())

    def put_unchecked(self, dkey: bytes, record: Record) -> None:
        """Store a record without checks (tests: a node that serves forged records)."""
        self._data.setdefault(dkey, {})[record.peer_id.digest] = record

    # kademlia's IStorage interface -------------------------------------------------------

    def __setitem__(self, key: bytes, value: Any) -> None:
        self.merge(key, value)

    def get(self, key: bytes, default: Any = None) -> Any:
        blobs = [r.encoded for r in self.records(key)]
        return blobs if blobs else default

    def __getitem__(self, key: bytes) -> list[bytes]:
        blobs: list[bytes] | None = self.get(key)
        if blobs is None:
            raise KeyError(key)
        return blobs

    def iter_older_than(self, seconds_old: float) -> list[tuple[bytes, list[bytes]]]:
        # Storing nodes never republish: expiry is absolute and owners re-announce.
        return []

    def __iter__(self) -> Iterator[tuple[bytes, list[bytes]]]:
        now = time.time()
        for dkey in list(self._data):
            blobs = [r.encoded for r in self.records(dkey, now)]
            if blobs:
                yield dkey, blobs
