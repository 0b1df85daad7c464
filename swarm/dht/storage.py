"""What a DHT node holds: for each key digest, at most N verified records merged by signer.

Replaces kademlia's ``ForgetfulStorage``, which keeps one value per key (last writer wins)
for a week and hands every value to the hourly republish. Here a store merges records by
the announcing peer, a record only replaces that peer's record with a higher ``seq``, expired
records vanish (a heap of expiries, so nothing is scanned), and storing nodes republish
nothing: announcing peers re-announce.

Strangers cannot crowd the storage out. Every stored record remembers the *source group* that
delivered it (`swarm.dht.sources`: a /24 or /64, or one endpoint on a LAN); each group stores at
most ``store_rate`` records per second here. When a key is full, or the node holds
``max_keys`` keys or ``max_stored_bytes``, a newcomer from group *g* takes the place of a
record of the group *h* holding the most (in that key, or on the node), and only if *h* holds
at least two more than *g*: an identity factory behind one subnet can fill empty room but
never keep anyone else out, and what was stored first by others stays. In a full key where
every group holds about as much as *g*, the largest group of groups (a /48 of many /64s,
one host of many ports: `swarm.dht.sources.super_group`) gives way the same way. Expiry
order plays no part (an attacker always chooses the longest one allowed). With a record prover
(`swarm.dht.proofs`), proven records come first: a proven newcomer to a full key takes the
place of an unproven record whatever the groups, and an unproven one never displaces a
proven one (node-wide quotas count groups only).
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import time
from collections import Counter
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Any

from kademlia.storage import IStorage

from swarm.dht.config import DHTConfig
from swarm.dht.proofs import ProofCache
from swarm.dht.records import DropReason, Record, VerifiedRecords, check_record
from swarm.dht.sources import RateLimiter, super_group
from swarm.dht.stats import StatsCounter

__all__ = ["LOCAL_SOURCE", "RecordStorage"]

LOCAL_SOURCE = "local"  # the group of records this node stores itself (its own announces)
# What a record and a key cost beyond their bytes (dict entries, objects, heap entries).
_RECORD_OVERHEAD = 200
_KEY_OVERHEAD = 300
_MAX_EVICTIONS_PER_STORE = 64


@dataclass(slots=True)
class _Held:
    record: Record
    group: str
    cost: int
    claim: Hashable | None = None
    proven: bool = False


class RecordStorage(IStorage):  # type: ignore[misc]
    """Records by key digest (SHA-1 of the text key, kademlia's key space) and signer.

    Values going in and out (the kademlia ``IStorage`` interface) are lists of encoded
    records. Every record is checked with `check_record` and must be bound to a key whose
    SHA-1 is the digest it is stored under. Only the DHT loop thread touches an instance.
    """

    def __init__(
        self,
        config: DHTConfig,
        stats: StatsCounter,
        proofs: ProofCache | None = None,
        verified: VerifiedRecords | None = None,
    ) -> None:
        self._config = config
        self._verified = verified
        self._stats = stats
        self._proofs = proofs
        self._by_claim: dict[Hashable, set[tuple[bytes, bytes]]] = {}
        self._data: dict[bytes, dict[bytes, _Held]] = {}
        self._sorted_keys: list[bytes] = []
        self._by_group: dict[str, dict[tuple[bytes, bytes], None]] = {}
        self._expiries: list[tuple[float, bytes, bytes]] = []
        self._bytes = 0
        self._records = 0
        self._rates = RateLimiter(config.admission.store_rate, config.admission.store_burst)

    def merge(
        self, dkey: bytes, blobs: object, source: str = LOCAL_SOURCE, now: float | None = None
    ) -> int:
        """Check and merge a list of encoded records delivered by source group ``source``;
        returns how many are now held (newly taken, or identical to the one held).

        Rejected records are counted by reason; never raises on peer input.
        """
        if not isinstance(blobs, list) or len(blobs) > self._config.storage.max_records_per_key:
            self._stats.drop(DropReason.MALFORMED)
            return 0
        now = time.time() if now is None else now
        self._expire(now)
        taken = 0
        for blob in blobs:
            if source != LOCAL_SOURCE and not self._rates.allow(source):
                self._stats.drop(DropReason.RATE_LIMITED)
                continue
            record = self._check(dkey, blob, now)
            if record is not None and self._admit(dkey, record, source):
                taken += 1
        self._update_gauges()
        return taken

    def _check(self, dkey: bytes, blob: object, now: float) -> Record | None:
        cfg = self._config
        result = check_record(
            blob,
            None,
            now=now,
            max_bytes=cfg.storage.max_record_bytes,
            max_ttl=cfg.storage.max_ttl,
            clock_skew=cfg.storage.clock_skew,
            verified=self._verified,
        )
        if isinstance(result, DropReason):
            self._stats.drop(result)
            return None
        if hashlib.sha1(result.key.encode("utf-8")).digest() != dkey:
            self._stats.drop(DropReason.WRONG_KEY)
            return None
        return result

    def _admit(self, dkey: bytes, record: Record, group: str) -> bool:
        slot = self._data.get(dkey, {})
        subkey = record.peer_id.digest
        held = slot.get(subkey)
        if held is not None:
            if held.record.seq >= record.seq:
                if held.record.encoded == record.encoded:
                    return True
                self._stats.drop(DropReason.STALE_SEQ)
                return False
            self._remove(dkey, subkey)  # its signer's newer record takes its place
            proof = self._proof_of(record, group)
            self._insert(dkey, _Held(record, group, _cost(record), *proof))
            return True
        new = _Held(record, group, _cost(record), *self._proof_of(record, group))
        if len(slot) >= self._config.storage.max_records_per_key:
            victim = _key_victim(slot, new)
            if victim is None:
                self._stats.drop(DropReason.KEY_FULL)
                return False
            self._remove(dkey, victim)
            self._stats.drop(DropReason.EVICTED)
        if not self._make_room(dkey, new.cost, group):
            self._stats.drop(DropReason.STORAGE_FULL)
            return False
        self._insert(dkey, new)
        return True

    def _proof_of(self, record: Record, group: str) -> tuple[Hashable | None, bool]:
        if self._proofs is None:
            return None, False
        claim = self._proofs.claim(record)
        return claim, self._proofs.proven(claim, group)

    def settle(self, claim: Hashable, ok: bool) -> None:
        """Record a prover's verdict on ``claim`` and mark the records that claim it."""
        if self._proofs is not None:
            self._proofs.settle(claim, ok)
        for dkey, subkey in self._by_claim.get(claim, ()):
            self._data[dkey][subkey].proven = ok

    def _make_room(self, dkey: bytes, cost: int, group: str) -> bool:
        cfg = self._config
        for _ in range(_MAX_EVICTIONS_PER_STORE):
            key_cost = _KEY_OVERHEAD if dkey not in self._data else 0
            keys_full = key_cost > 0 and len(self._data) >= cfg.storage.max_keys
            if not keys_full and self._bytes + cost + key_cost <= cfg.storage.max_stored_bytes:
                return True
            victim = self._node_victim(group)
            if victim is None:
                return False
            self._remove(*victim)
            self._stats.drop(DropReason.EVICTED)
        return False

    def _node_victim(self, group: str) -> tuple[bytes, bytes] | None:
        """The oldest record of the group holding the most, if it holds two more than
        ``group``."""
        if not self._by_group:
            return None
        top = max(self._by_group, key=lambda g: len(self._by_group[g]))
        if len(self._by_group[top]) < len(self._by_group.get(group, ())) + 2:
            return None
        return next(iter(self._by_group[top]))

    def _insert(self, dkey: bytes, held: _Held) -> None:
        slot = self._data.get(dkey)
        if slot is None:
            slot = self._data[dkey] = {}
            bisect.insort(self._sorted_keys, dkey)
            self._bytes += _KEY_OVERHEAD
        record = held.record
        subkey = record.peer_id.digest
        slot[subkey] = held
        self._bytes += held.cost
        self._records += 1
        self._by_group.setdefault(held.group, {})[(dkey, subkey)] = None
        if held.claim is not None:
            self._by_claim.setdefault(held.claim, set()).add((dkey, subkey))
        heapq.heappush(self._expiries, (record.expires_at, dkey, subkey))

    def _remove(self, dkey: bytes, subkey: bytes) -> None:
        slot = self._data[dkey]
        held = slot.pop(subkey)
        self._bytes -= held.cost
        self._records -= 1
        members = self._by_group[held.group]
        del members[(dkey, subkey)]
        if not members:
            del self._by_group[held.group]
        if held.claim is not None:
            claimed = self._by_claim[held.claim]
            claimed.discard((dkey, subkey))
            if not claimed:
                del self._by_claim[held.claim]
        if not slot:
            del self._data[dkey]
            del self._sorted_keys[bisect.bisect_left(self._sorted_keys, dkey)]
            self._bytes -= _KEY_OVERHEAD

    def _expire(self, now: float) -> None:
        heap = self._expiries
        while heap and heap[0][0] <= now:
            expires_at, dkey, subkey = heapq.heappop(heap)
            held = self._data.get(dkey, {}).get(subkey)
            if held is not None and held.record.expires_at == expires_at:
                self._remove(dkey, subkey)

    def _update_gauges(self) -> None:
        self._stats.gauge("keys_stored", len(self._data))
        self._stats.gauge("records_stored", self._records)
        self._stats.gauge("stored_bytes", self._bytes)

    def records(self, dkey: bytes, now: float | None = None) -> list[Record]:
        """The live records held under a key digest (expired ones are removed)."""
        self._expire(time.time() if now is None else now)
        self._update_gauges()
        return [held.record for held in self._data.get(dkey, {}).values()]

    def keys_near(self, node_id: bytes, limit: int) -> list[bytes]:
        """Up to ``limit`` stored key digests sharing the longest prefix with ``node_id``:
        the keys a new contact there may be among the closest nodes for. Costs
        O(log(keys)) steps plus the keys returned, however many keys are stored."""
        keys = self._sorted_keys
        target = int.from_bytes(node_id, "big")

        def span(prefix_bits: int) -> tuple[int, int]:
            mask = (1 << (160 - prefix_bits)) - 1
            low, high = (target & ~mask).to_bytes(20, "big"), (target | mask).to_bytes(20, "big")
            return bisect.bisect_left(keys, low), bisect.bisect_right(keys, high)

        lo_bits, hi_bits = 0, 160  # the fewest prefix bits whose span holds <= limit keys
        while lo_bits < hi_bits:
            mid = (lo_bits + hi_bits) // 2
            start, stop = span(mid)
            if stop - start <= limit:
                hi_bits = mid
            else:
                lo_bits = mid + 1
        start, stop = span(lo_bits)
        return keys[start:stop][:limit]

    def put_unchecked(self, dkey: bytes, record: Record) -> None:
        """Store a record without checks (tests: a node that serves forged records)."""
        if record.peer_id.digest in self._data.get(dkey, {}):
            self._remove(dkey, record.peer_id.digest)
        self._insert(dkey, _Held(record, LOCAL_SOURCE, _cost(record)))

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
        self._expire(time.time())
        for dkey, slot in list(self._data.items()):
            yield dkey, [held.record.encoded for held in slot.values()]


def _cost(record: Record) -> int:
    return len(record.encoded) + _RECORD_OVERHEAD


def _key_victim(slot: dict[bytes, _Held], new: _Held) -> bytes | None:
    """In a full key, the record ``new`` may replace, if any: among the unproven records if
    there are any (else the proven ones), the latest-expiring of the group holding the most;
    if ``new`` is proven and the pool is not, any such record; else only if that group holds
    at least two more of the pool than ``new``'s group, or failing that, if the largest group
    of groups (`super_group`) holds two more than ``new``'s: then from its largest group.
    So a full key keeps room for a newcomer unless every group of groups holds about as much
    as the newcomer's."""
    pool = {s: held for s, held in slot.items() if not held.proven} or slot
    pool_proven = next(iter(pool.values())).proven
    if pool_proven and not new.proven:
        return None
    counts = Counter(held.group for held in pool.values())
    top, top_count = max(counts.items(), key=lambda item: item[1])
    if pool_proven == new.proven and top_count < counts.get(new.group, 0) + 2:
        supers = Counter(super_group(held.group) for held in pool.values())
        biggest, most = max(supers.items(), key=lambda item: item[1])
        if most < supers.get(super_group(new.group), 0) + 2:
            return None
        top = max((g for g in counts if super_group(g) == biggest), key=lambda g: counts[g])
    mine = [s for s, held in pool.items() if held.group == top]
    return max(mine, key=lambda s: pool[s].record.expires_at)
