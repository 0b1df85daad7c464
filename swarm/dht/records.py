"""Signed, expiring DHT records: one per (key, announcing peer).

A record on the wire is a msgpack array::

    [version, key, public_key, peer_id, value, expires_at, seq, signature]

- ``key``: the DHT key (text) it was announced under, so it cannot be replayed elsewhere;
- ``public_key``: the signer's raw Ed25519 key; ``peer_id`` (the subkey) must be its SHA-256;
- ``value``: the msgpack bytes of a ``{str: ...}`` map, or nil for a retraction (tombstone);
- ``expires_at``: absolute Unix time (wall clock); republishing cannot extend it because it
  is signed;
- ``seq``: grows with every announce by the same peer under the same key; a lower ``seq``
  never replaces a higher one;
- ``signature``: Ed25519 over a domain tag plus the msgpack of the first seven fields.

`check_record` is run by storing nodes and again by readers: a record that fails any check is
dropped and counted under a `DropReason`. A node sees the same record many times (every
replica of a lookup, every read of a key until the record is re-announced); with a
`VerifiedRecords`, `check_record` verifies the signature of given bytes once and then
remembers their SHA-256: the encoded record holds every field the signature covers (key,
public key, peer id, value, expiry, seq) and the signature itself, so a record with any
byte changed is verified afresh. The checks that depend on the moment (expiry, TTL) and on
the key asked for run every time.
"""

from __future__ import annotations

import enum
import hashlib
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from swarm.errors import RecordError
from swarm.identity import Identity, verify_signature
from swarm.types import PeerId

__all__ = [
    "RECORD_VERSION",
    "VERIFIED_CAPACITY",
    "DropReason",
    "Record",
    "VerifiedRecords",
    "check_record",
    "make_record",
]

RECORD_VERSION = 1
VERIFIED_CAPACITY = 4096  # digests remembered (32 bytes each, plus the dict's overhead)
_SIGNING_TAG = b"swarm-dht-record-v1\0"


class DropReason(enum.Enum):
    """Why a record was not stored or not returned (keys of the drop counters)."""

    MALFORMED = "malformed"  # not a record: wrong shape, types, or value schema
    TOO_LARGE = "too_large"  # encoded record over max_record_bytes
    WRONG_KEY = "wrong_key"  # signed for another DHT key
    SUBKEY_MISMATCH = "subkey_mismatch"  # peer_id is not the hash of the signing key
    BAD_SIGNATURE = "bad_signature"  # signature invalid: forged, or a field was tampered with
    EXPIRED = "expired"  # expires_at is in the past
    TTL_TOO_LONG = "ttl_too_long"  # expires further ahead than max_ttl + clock_skew
    STALE_SEQ = "stale_seq"  # an equal-or-newer record from this peer is already held
    EVICTED = "evicted"  # gave its place to a record from a less represented source group
    KEY_FULL = "key_full"  # the key was full and the sender's group already held its share
    STORAGE_FULL = "storage_full"  # the node held max_keys / max_stored_bytes, likewise
    RATE_LIMITED = "rate_limited"  # the sender's group stored more than store_rate per second


@dataclass(frozen=True)
class Record:
    """One peer's signed announcement under one key.

    ``value`` is ``None`` for a retraction (a tombstone that replaces the peer's record until
    it expires). ``encoded`` is the exact signed wire form.
    """

    key: str
    peer_id: PeerId
    public_key: bytes
    value: Mapping[str, Any] | None
    expires_at: float
    seq: int
    encoded: bytes

    @property
    def retracted(self) -> bool:
        return self.value is None

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at <= (time.time() if now is None else now)


class VerifiedRecords:
    """The SHA-256 digests of encoded records whose signer and signature checked out, the
    most recently seen ``capacity`` of them (thread-safe: a node checks records on its DHT
    loop thread and, merging a read, on trio's)."""

    def __init__(self, capacity: int = VERIFIED_CAPACITY) -> None:
        self.capacity = capacity
        self._digests: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0  # checks that found the bytes already verified
        self.verified = 0  # signatures verified (and found good or bad)

    def __len__(self) -> int:
        return len(self._digests)

    def seen(self, digest: bytes) -> bool:
        """Whether ``digest`` is of bytes verified before (counts a hit; refreshes it)."""
        with self._lock:
            if digest in self._digests:
                self._digests.move_to_end(digest)
                self.hits += 1
                return True
            self.verified += 1
            return False

    def add(self, digest: bytes) -> None:
        """Remember ``digest`` as verified, forgetting the least recent past ``capacity``."""
        with self._lock:
            self._digests[digest] = None
            self._digests.move_to_end(digest)
            while len(self._digests) > self.capacity:
                self._digests.popitem(last=False)


def _signed_part(
    key: str, public_key: bytes, peer_id: bytes, value: bytes | None, expires_at: float, seq: int
) -> bytes:
    fields = [RECORD_VERSION, key, public_key, peer_id, value, expires_at, seq]
    packed: bytes = msgpack.packb(fields, use_bin_type=True)
    return _SIGNING_TAG + packed


def make_record(
    identity: Identity,
    key: str,
    value: Mapping[str, Any] | None,
    expires_at: float,
    seq: int,
    max_bytes: int,
) -> Record:
    """Sign a record. Raises `RecordError` if the value is not a msgpack-able ``{str: ...}``
    map or the encoded record exceeds ``max_bytes``."""
    value_bytes = None
    if value is not None:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise RecordError(f"a record value for {key!r} must be a mapping with str keys")
        try:
            value_bytes = msgpack.packb(dict(value), use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise RecordError(f"record value for {key!r} is not msgpack-able: {exc}") from exc
    expires_at = float(expires_at)
    pub, pid = identity.public_key, identity.peer_id.digest
    signature = identity.sign(_signed_part(key, pub, pid, value_bytes, expires_at, seq))
    fields = [RECORD_VERSION, key, pub, pid, value_bytes, expires_at, seq, signature]
    encoded = msgpack.packb(fields, use_bin_type=True)
    if len(encoded) > max_bytes:
        raise RecordError(
            f"record for {key!r} is {len(encoded)} bytes signed; a DHT record holds at most "
            f"{max_bytes} bytes (DHTConfig.storage.max_record_bytes) so that a key's records "
            "fit one datagram: announce less data"
        )
    return Record(key, identity.peer_id, pub, value, expires_at, seq, encoded)


def _unpack(blob: bytes) -> Any:
    return msgpack.unpackb(
        blob, raw=False, strict_map_key=True, max_bin_len=len(blob), max_str_len=len(blob)
    )


def _parse(blob: bytes) -> tuple[list[Any], Mapping[str, Any] | None] | None:
    """The record's fields and decoded value, or None if the shape or types are wrong."""
    try:
        fields = _unpack(blob)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        return None
    if not isinstance(fields, list) or len(fields) != 8 or fields[0] != RECORD_VERSION:
        return None
    _, key, pub, pid, value_bytes, expires_at, seq, sig = fields
    types_ok = (
        isinstance(key, str)
        and isinstance(pub, bytes)
        and len(pub) == 32
        and isinstance(pid, bytes)
        and len(pid) == 32
        and (value_bytes is None or isinstance(value_bytes, bytes))
        and isinstance(expires_at, float)
        and math.isfinite(expires_at)
        and isinstance(seq, int)
        and not isinstance(seq, bool)
        and seq >= 0
        and isinstance(sig, bytes)
        and len(sig) == 64
    )
    if not types_ok:
        return None
    if value_bytes is None:
        return fields, None
    try:
        value = _unpack(value_bytes)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        return None
    return fields, value


def check_record(
    blob: object,
    key: str | None,
    *,
    now: float,
    max_bytes: int,
    max_ttl: float,
    clock_skew: float,
    verified: VerifiedRecords | None = None,
) -> Record | DropReason:
    """Decode and verify one record from a peer; returns the `Record`, or why it was dropped.

    ``key`` is the DHT key the record must be bound to (None on storing nodes, which only know
    the key's SHA-1; they compare the digest themselves). With ``verified``, the signer and
    signature of bytes already verified there are not verified again (the other checks
    are). Never raises on peer input.
    """
    if not isinstance(blob, bytes):
        return DropReason.MALFORMED
    if len(blob) > max_bytes:
        return DropReason.TOO_LARGE
    parsed = _parse(blob)
    if parsed is None:
        return DropReason.MALFORMED
    fields, value = parsed
    _, rkey, pub, pid, value_bytes, expires_at, seq, sig = fields
    if key is not None and rkey != key:
        return DropReason.WRONG_KEY
    digest = hashlib.sha256(blob).digest() if verified is not None else b""
    if verified is None or not verified.seen(digest):
        if PeerId.from_public_key(pub).digest != pid:
            return DropReason.SUBKEY_MISMATCH
        signed = _signed_part(rkey, pub, pid, value_bytes, expires_at, seq)
        if not verify_signature(pub, sig, signed):
            return DropReason.BAD_SIGNATURE
        if verified is not None:
            verified.add(digest)
    if expires_at <= now:
        return DropReason.EXPIRED
    if expires_at > now + max_ttl + clock_skew:
        return DropReason.TTL_TOO_LONG
    return Record(rkey, PeerId(pid), pub, value, expires_at, seq, blob)
