"""Counters a DHT node keeps, shared between its asyncio thread and trio."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from swarm.dht.records import DropReason

__all__ = ["DHTStatistics", "StatsCounter"]


@dataclass(frozen=True)
class DHTStatistics:
    """A snapshot of one node's counters.

    ``dropped`` counts records dropped on store or on read, by `DropReason` value
    (``"bad_signature"``, ``"expired"``, ...). ``datagrams_rejected`` counts datagrams that
    failed authentication (private swarm) and ``datagrams_malformed`` ones that did not parse.
    ``contacts_refused`` counts verified nodes kept out of the routing table by the address,
    IP and subnet caps; ``requests_rate_limited`` requests left unanswered by
    ``request_rate``; ``rpc_timeouts`` requests of ours that got no reply; ``handoffs`` stores
    sent to new contacts (and ``handoffs_skipped`` those ``handoff_rate`` held back);
    ``proofs_passed`` / ``proofs_failed`` the verdicts of a record prover, and
    ``proof_claims_dropped`` claims the proof queue had no room for. ``datagrams_sent`` /
    ``datagrams_received`` count every datagram; ``replies_need_token`` answers replaced by
    a token because they were too large for an unproven address, and
    ``requests_repeated_with_token`` our requests sent again with the token so obtained.
    ``signatures_verified`` counts record signatures checked with Ed25519 and
    ``signatures_cached`` checks of bytes verified before (`swarm.dht.records.VerifiedRecords`).
    """

    dropped: Mapping[str, int] = field(default_factory=dict)
    records_stored: int = 0
    keys_stored: int = 0
    stored_bytes: int = 0
    routing_table_size: int = 0
    datagrams_rejected: int = 0
    datagrams_malformed: int = 0
    replies_too_large: int = 0
    contacts_evicted: int = 0
    contacts_refused: int = 0
    requests_rate_limited: int = 0
    rpc_timeouts: int = 0
    handoffs: int = 0
    handoffs_skipped: int = 0
    proofs_passed: int = 0
    proofs_failed: int = 0
    announces: int = 0
    gets: int = 0
    proof_claims_dropped: int = 0
    datagrams_sent: int = 0
    datagrams_received: int = 0
    replies_need_token: int = 0
    requests_repeated_with_token: int = 0
    signatures_verified: int = 0
    signatures_cached: int = 0

    def dropped_total(self) -> int:
        return sum(self.dropped.values())


class StatsCounter:
    """Thread-safe counters; written on the DHT loop thread, read from trio."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._dropped: Counter[str] = Counter()
        self._events: Counter[str] = Counter()
        self._gauges: dict[str, int] = {}

    def drop(self, reason: DropReason, n: int = 1) -> None:
        with self._lock:
            self._dropped[reason.value] += n

    def event(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._events[name] += n

    def gauge(self, name: str, value: int) -> None:
        with self._lock:
            self._gauges[name] = value

    def snapshot(self) -> DHTStatistics:
        with self._lock:
            ev, g = self._events, self._gauges
            return DHTStatistics(
                dropped=dict(self._dropped),
                records_stored=g.get("records_stored", 0),
                keys_stored=g.get("keys_stored", 0),
                stored_bytes=g.get("stored_bytes", 0),
                routing_table_size=g.get("routing_table_size", 0),
                datagrams_rejected=ev["datagrams_rejected"],
                datagrams_malformed=ev["datagrams_malformed"],
                replies_too_large=ev["replies_too_large"],
                contacts_evicted=ev["contacts_evicted"],
                contacts_refused=ev["contacts_refused"],
                requests_rate_limited=ev["requests_rate_limited"],
                rpc_timeouts=ev["rpc_timeouts"],
                handoffs=ev["handoffs"],
                handoffs_skipped=ev["handoffs_skipped"],
                proofs_passed=ev["proofs_passed"],
                proofs_failed=ev["proofs_failed"],
                announces=ev["announces"],
                gets=ev["gets"],
                proof_claims_dropped=ev["proof_claims_dropped"],
                datagrams_sent=ev["datagrams_sent"],
                datagrams_received=ev["datagrams_received"],
                replies_need_token=ev["replies_need_token"],
                requests_repeated_with_token=ev["requests_repeated_with_token"],
            )
