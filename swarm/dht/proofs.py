"""Proven records: a storing node may ask the layer above whether a record's signer proved,
at the address its record announces, that it holds the record's `PeerId`.

The DHT knows nothing of what records mean, so the caller of `DHTNode.open` passes a
`RecordProver`: ``claim(record)`` says what there is to prove (an opaque hashable, e.g.
``(peer_id, host, port)`` read from the announcement, or None for a record that claims
nothing); ``prove(claim)`` checks it (e.g. dials ``host:port`` and completes a handshake that
expects ``peer_id``). Storing nodes keep proven records before unproven ones when a key is
full (`swarm.dht.storage`).

Costs are bounded here, not by the prover: each claim is proven at most once per
``DHTConfig.proof_ttl`` (verdicts are cached, pending claims deduplicated, at most
``_MAX_CLAIMS`` remembered), at most ``proof_concurrency`` proofs run at once, at most
``proof_rate`` start per second, each within ``proof_timeout``; claims beyond the queue are
dropped (the record stays unproven; its next re-announce asks again). A record refused from a
full key still has its claim proven, so the signer's next re-announce gets in as proven.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Protocol

import trio

from swarm.dht.config import DHTConfig
from swarm.dht.records import Record
from swarm.dht.stats import StatsCounter

__all__ = ["ProofCache", "RecordProver", "run_proofs"]

log = logging.getLogger(__name__)

_MAX_CLAIMS = 4_096
_QUEUE = 256


class RecordProver(Protocol):
    """What the layer above passes as ``DHTNode.open(..., prover=...)``."""

    def claim(self, record: Record) -> Hashable | None:
        """What proving ``record`` means, or None if it claims nothing provable. Called on the
        DHT loop thread for every record a storing node takes: a fast, pure function of the
        record that must not block (an exception counts as None)."""
        ...

    async def prove(self, claim: Hashable) -> bool:
        """Whether the claim holds (trio; cancelled after ``DHTConfig.proof_timeout``; an
        exception counts as False)."""
        ...


class ProofCache:
    """Verdicts by claim, and the claims waiting for one (DHT loop thread only).

    ``submit`` is how a claim reaches the prover (a thread-safe callable set by `DHTNode`).
    """

    def __init__(self, prover: RecordProver, config: DHTConfig, stats: StatsCounter) -> None:
        self._prover = prover
        self._ttl = config.proof_ttl
        self._stats = stats
        self._verdicts: OrderedDict[Hashable, tuple[bool, float]] = OrderedDict()
        # claims asked for, with when to ask again if no verdict came (one may be dropped)
        self._pending: dict[Hashable, float] = {}
        self._retry_after = 4 * config.proof_timeout + _QUEUE / config.proof_rate
        self.submit: Callable[[Hashable], None] = lambda claim: None

    def claim(self, record: Record) -> Hashable | None:
        try:
            claim = self._prover.claim(record)
            hash(claim)
        except Exception:  # the prover is the caller's code; a bad claim proves nothing
            log.debug("the record prover's claim failed", exc_info=True)
            return None
        return claim

    def proven(self, claim: Hashable | None, now: float | None = None) -> bool:
        """True if ``claim`` was proven lately; else asks for a proof (once) and says False."""
        if claim is None:
            return False
        now = time.monotonic() if now is None else now
        verdict = self._verdicts.get(claim)
        if verdict is not None and verdict[1] > now:
            return verdict[0]
        retry = self._pending.get(claim)
        if retry is not None and retry > now:
            return False
        if retry is None and len(self._pending) >= _QUEUE:
            self._pending = {c: t for c, t in self._pending.items() if t > now}
            if len(self._pending) >= _QUEUE:
                return False
        self._pending[claim] = now + self._retry_after
        self.submit(claim)
        return False

    def settle(self, claim: Hashable, ok: bool, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._pending.pop(claim, None)
        self._verdicts.pop(claim, None)
        self._verdicts[claim] = (ok, now + self._ttl)
        while len(self._verdicts) > _MAX_CLAIMS:
            self._verdicts.popitem(last=False)
        self._stats.event("proofs_passed" if ok else "proofs_failed")


async def run_proofs(
    prover: RecordProver,
    config: DHTConfig,
    claims: trio.MemoryReceiveChannel[Hashable],
    settle: Callable[[Hashable, bool], Awaitable[None]],
) -> None:
    """Prove claims as they arrive (rate- and concurrency-limited) and ``settle`` each
    verdict; runs until ``claims`` is closed or the task is cancelled."""
    limit = trio.CapacityLimiter(config.proof_concurrency)
    interval = 1.0 / config.proof_rate

    async def one(claim: Hashable) -> None:
        ok = False
        async with limit:
            try:
                with trio.move_on_after(config.proof_timeout):
                    ok = bool(await prover.prove(claim))
            except Exception:  # the prover is the caller's code: a failure is a failed proof
                log.debug("the record prover failed", exc_info=True)
        await settle(claim, ok)

    async with trio.open_nursery() as nursery:
        async for claim in claims:  # at most _QUEUE pending (ProofCache), so tasks are bounded
            nursery.start_soon(one, claim)
            await trio.sleep(interval)
