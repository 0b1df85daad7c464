"""Proven records: a storing node may ask the layer above whether a record's signer proved,
at the address its record announces, that it holds the record's `PeerId`.

The DHT knows nothing of what records mean, so the caller of `DHTNode.open` passes a
`RecordProver`: ``claim(record)`` says what there is to prove (an opaque hashable, e.g.
``(peer_id, host, port)`` read from the announcement, or None for a record that claims
nothing); ``prove(claim)`` checks it (e.g. dials ``host:port`` and completes a handshake that
expects ``peer_id``). Storing nodes keep proven records before unproven ones when a key is
full (`swarm.dht.storage`).

Costs are bounded here, not by the prover: each claim is proven at most once per
``DHTConfig.proofs.ttl`` (verdicts are cached, pending claims deduplicated, at most
``_MAX_CLAIMS`` remembered), at most ``proof_concurrency`` proofs run at once, at most
``proof_rate`` start per second, each within ``proof_timeout``. A record refused from a full
key still has its claim proven, so the signer's next re-announce gets in as proven.

Proof work is shared fairly by the *source group* that delivered each record
(`swarm.dht.sources`), so that a flood of forged records naming silent listeners cannot
starve a newcomer's claim: one group has at most ``_GROUP_PENDING`` claims pending and
``_GROUP_QUEUE`` waiting in `ClaimQueue`, which hands them out round robin over groups; when
the queue is full, a claim from a group holding fewer than the largest takes the place of
that group's newest claim. A claim left out is asked again on its record's next store after
its retry time. Meanwhile the record is held (unproven, so it gives way to proven ones in a
full key) and served.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Protocol

import trio

from swarm.dht.config import DHTConfig
from swarm.dht.records import Record
from swarm.dht.stats import StatsCounter

__all__ = ["ClaimQueue", "ProofCache", "RecordProver", "run_proofs"]

log = logging.getLogger(__name__)

_MAX_CLAIMS = 4_096
_QUEUE = 1_024  # claims waiting for a proof slot, all groups together
_GROUP_QUEUE = 16  # ... from one source group
_GROUP_PENDING = 64  # claims asked for and not settled, from one source group
_RETRY_QUEUE = 256  # claims a dropped one is assumed to wait behind, for its retry time


class RecordProver(Protocol):
    """What the layer above passes as ``DHTNode.open(..., prover=...)``."""

    def claim(self, record: Record) -> Hashable | None:
        """What proving ``record`` means, or None if it claims nothing provable. Called on the
        DHT loop thread for every record a storing node takes: a fast, pure function of the
        record that must not block (an exception counts as None)."""
        ...

    async def prove(self, claim: Hashable) -> bool:
        """Whether the claim holds (trio; cancelled after ``DHTConfig.proofs.timeout``; an
        exception counts as False)."""
        ...


class ProofCache:
    """Verdicts by claim, and the claims waiting for one (DHT loop thread only).

    ``submit`` is how a claim reaches the prover, with the source group that delivered its
    record (a thread-safe callable set by `DHTNode`).
    """

    def __init__(self, prover: RecordProver, config: DHTConfig, stats: StatsCounter) -> None:
        self._prover = prover
        self._ttl = config.proofs.ttl
        self._stats = stats
        self._verdicts: OrderedDict[Hashable, tuple[bool, float]] = OrderedDict()
        # claims asked for: when to ask again if no verdict came (one may be dropped), and
        # the group that asked
        self._pending: dict[Hashable, tuple[float, str]] = {}
        self._pending_by_group: Counter[str] = Counter()
        self._retry_after = 4 * config.proofs.timeout + _RETRY_QUEUE / config.proofs.rate
        self.submit: Callable[[Hashable, str], None] = lambda claim, group: None

    def claim(self, record: Record) -> Hashable | None:
        try:
            claim = self._prover.claim(record)
            hash(claim)
        except Exception:  # the prover is the caller's code; a bad claim proves nothing
            log.debug("the record prover's claim failed", exc_info=True)
            return None
        return claim

    def proven(self, claim: Hashable | None, group: str = "", now: float | None = None) -> bool:
        """True if ``claim`` was proven lately; else asks for a proof (once, within ``group``'s
        share of pending claims) and says False."""
        if claim is None:
            return False
        now = time.monotonic() if now is None else now
        verdict = self._verdicts.get(claim)
        if verdict is not None and verdict[1] > now:
            return verdict[0]
        pending = self._pending.get(claim)
        if pending is not None and pending[0] > now:
            return False
        if pending is not None:
            self._unpend(claim)
        if self._pending_by_group[group] >= _GROUP_PENDING or len(self._pending) >= _MAX_CLAIMS:
            for old in [c for c, (t, _) in self._pending.items() if t <= now]:
                self._unpend(old)
            if self._pending_by_group[group] >= _GROUP_PENDING or len(self._pending) >= _MAX_CLAIMS:
                self._stats.event("proof_claims_dropped")
                return False
        self._pending[claim] = (now + self._retry_after, group)
        self._pending_by_group[group] += 1
        self.submit(claim, group)
        return False

    def _unpend(self, claim: Hashable) -> None:
        entry = self._pending.pop(claim, None)
        if entry is not None:
            self._pending_by_group[entry[1]] -= 1
            if self._pending_by_group[entry[1]] <= 0:
                del self._pending_by_group[entry[1]]

    def settle(self, claim: Hashable, ok: bool, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._unpend(claim)
        self._verdicts.pop(claim, None)
        self._verdicts[claim] = (ok, now + self._ttl)
        while len(self._verdicts) > _MAX_CLAIMS:
            self._verdicts.popitem(last=False)
        self._stats.event("proofs_passed" if ok else "proofs_failed")


class ClaimQueue:
    """Claims waiting for a proof slot, handed out round robin over source groups (trio
    thread). Holds at most ``_GROUP_QUEUE`` claims of one group and ``_QUEUE`` in all; see
    the module docstring for who gives way when it is full."""

    def __init__(self, stats: StatsCounter | None = None) -> None:
        self._groups: OrderedDict[str, deque[Hashable]] = OrderedDict()  # next group first
        self._queued: set[Hashable] = set()
        self._size = 0
        self._stats = stats
        self._ready = trio.Event()

    def __len__(self) -> int:
        return self._size

    def offer(self, claim: Hashable, group: str) -> bool:
        """Queue ``claim`` for ``group``; False if it was left out (or is queued already)."""
        if claim in self._queued:
            return False
        mine = self._groups.get(group)
        if mine is not None and len(mine) >= _GROUP_QUEUE:
            return self._dropped()
        if self._size >= _QUEUE:
            top = max(self._groups, key=lambda g: len(self._groups[g]))
            if len(self._groups[top]) <= (len(mine) if mine is not None else 0) + 1:
                return self._dropped()
            self._queued.discard(self._groups[top].pop())  # the largest group's newest
            self._size -= 1
            self._dropped()
        self._groups.setdefault(group, deque()).append(claim)
        self._queued.add(claim)
        self._size += 1
        self._ready.set()
        return True

    def _dropped(self) -> bool:
        if self._stats is not None:
            self._stats.event("proof_claims_dropped")
        return False

    async def take(self) -> Hashable:
        """The next group's oldest claim (waits for one)."""
        while not self._groups:
            self._ready = trio.Event()
            await self._ready.wait()
        group, claims = self._groups.popitem(last=False)
        claim = claims.popleft()
        if claims:
            self._groups[group] = claims  # to the back of the round
        self._queued.discard(claim)
        self._size -= 1
        return claim


async def run_proofs(
    prover: RecordProver,
    config: DHTConfig,
    claims: trio.MemoryReceiveChannel[tuple[Hashable, str]],
    settle: Callable[[Hashable, bool], Awaitable[None]],
    stats: StatsCounter | None = None,
) -> None:
    """Prove claims as they arrive, ``(claim, group)`` pairs, fairly over groups (a
    `ClaimQueue`), rate- and concurrency-limited, and ``settle`` each verdict; runs until
    ``claims`` is closed or the task is cancelled."""
    limit = trio.CapacityLimiter(config.proofs.concurrency)
    interval = 1.0 / config.proofs.rate
    queue = ClaimQueue(stats)

    async def one(claim: Hashable, slot: object) -> None:
        ok = False
        try:
            with trio.move_on_after(config.proofs.timeout):
                ok = bool(await prover.prove(claim))
        except Exception:  # the prover is the caller's code: a failure is a failed proof
            log.debug("the record prover failed", exc_info=True)
        finally:
            limit.release_on_behalf_of(slot)
        await settle(claim, ok)

    async def collect() -> None:
        async for claim, group in claims:
            queue.offer(claim, group)
        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect)
        while True:  # a slot first, then the claim: who goes next is decided when one is free
            slot = object()
            await limit.acquire_on_behalf_of(slot)
            claim = await queue.take()
            nursery.start_soon(one, claim, slot)
            await trio.sleep(interval)
