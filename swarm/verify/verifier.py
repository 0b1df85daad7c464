"""`Verifier`: applies a `VerifyPolicy` to a running generation (network-agnostic).

The client hands it, after each step (spot-check, redundant) or once before the generation
returns (optimistic), what each hop did (`HopObservation`), how to find peers able to re-run a
layer range (``candidates``) and how to run a stateless forward on one (``forward``). It picks
the hops to audit (policy rate raised by suspicion, lowered by stake and clean history), runs
`audit_hop`, records the outcome in `Reputation` (and slashes through a `Ledger`), hands a
proven lie to its `EvidenceReporter` (which publishes through whatever sink it was given),
and tells the client the first token position to roll back to when the checked peer lied.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from swarm.types import LayerRange, PeerId
from swarm.verify.audit import (
    AuditResult,
    AuditVerdict,
    Candidate,
    ForwardFn,
    HopRecord,
    audit_hop,
)
from swarm.verify.ledger import Ledger
from swarm.verify.policy import PolicyKind, VerifyPolicy
from swarm.verify.reporting import EvidenceReporter
from swarm.verify.reputation import Reputation
from swarm.verify.suspicion import NormStats, SuspicionConfig, audit_rate, too_fast

__all__ = ["CandidatesFn", "HopObservation", "Verdict", "Verifier", "VerifierStatistics"]

log = logging.getLogger(__name__)

CandidatesFn = Callable[[LayerRange], Awaitable[Sequence[Candidate]]]


@dataclass(frozen=True)
class HopObservation:
    """One hop after a step: its history and how fast the last step came back."""

    record: HopRecord
    new_tokens: int  # positions added by the last step
    seconds: float  # time of the last step on this hop
    throughput: float  # announced tokens/s for the peer's span


@dataclass
class Verdict:
    """What the client must do: roll back to ``rollback_position`` (None: nothing) and stop
    routing to ``banned``."""

    rollback_position: int | None = None
    banned: list[PeerId] = field(default_factory=list)
    results: list[AuditResult] = field(default_factory=list)


@dataclass(frozen=True)
class VerifierStatistics:
    """What verification did so far (``swarm generate --json`` prints it)."""

    policy: str
    audits: int
    reruns: int
    rerun_tokens: int
    detections: tuple[tuple[str, int], ...]  # (liar's peer id, step)
    unchecked: int = 0  # audits skipped: no other server serves those layers
    unchecked_ranges: tuple[str, ...] = ()  # those layer ranges, "start:stop"


@dataclass
class Verifier:
    """The verification state of one client: policy, reputation, stake, statistics."""

    policy: VerifyPolicy
    reputation: Reputation = field(default_factory=Reputation)
    ledger: Ledger | None = None
    suspicion: SuspicionConfig = field(default_factory=SuspicionConfig)
    rng: random.Random = field(default_factory=random.Random)
    reporter: EvidenceReporter | None = None
    norms: NormStats = field(default_factory=NormStats)
    audits: int = 0
    reruns: int = 0
    rerun_tokens: int = 0
    detections: list[tuple[PeerId, int]] = field(default_factory=list)  # (liar, step)
    unchecked: int = 0  # audits that found no other peer to re-run the hop
    unchecked_ranges: set[LayerRange] = field(default_factory=set)

    def statistics(self) -> VerifierStatistics:
        return VerifierStatistics(
            policy=str(self.policy),
            audits=self.audits,
            reruns=self.reruns,
            rerun_tokens=self.rerun_tokens,
            detections=tuple((str(p), s) for p, s in self.detections),
            unchecked=self.unchecked,
            unchecked_ranges=tuple(sorted(str(r) for r in self.unchecked_ranges)),
        )

    def rate_for(self, obs: HopObservation) -> float:
        """This hop's audit probability for this step."""
        if self.policy.kind is PolicyKind.REDUNDANT:
            return 1.0
        out = obs.record.outputs[:, -obs.new_tokens :]  # (batch, new, hidden)
        norm = float(out.float().norm(dim=-1).mean())
        outlier = self.norms.is_outlier(obs.record.layers, norm)
        fast = too_fast(
            obs.seconds,
            obs.new_tokens * out.shape[0],
            obs.throughput,
            self.suspicion.fast_fraction,
        )
        stake = self.ledger.stake_of(obs.record.peer_id) if self.ledger is not None else 0.0
        rec = self.reputation.record(obs.record.peer_id)
        return audit_rate(
            self.policy.rate,
            rec,
            stake=stake,
            outlier=outlier,
            fast=fast,
            config=self.suspicion,
        )

    async def check_step(
        self,
        hops: Sequence[HopObservation],
        step: int,
        candidates: CandidatesFn,
        forward: ForwardFn,
    ) -> Verdict:
        """Audit the hops the policy picks for this step (spot-check, redundant)."""
        verdict = Verdict()
        if not self.policy.checks_steps:
            return verdict
        checkers = max(self.policy.replicas - 1, 1)
        for obs in hops:
            if self.rng.random() >= self.rate_for(obs):
                continue
            checked = slice(obs.record.inputs.shape[1] - obs.new_tokens, None)
            await self._audit(obs.record, step, checked, checkers, candidates, forward, verdict)
        return verdict

    async def check_session(
        self,
        hops: Sequence[HopRecord],
        step: int,
        candidates: CandidatesFn,
        forward: ForwardFn,
    ) -> Verdict:
        """Optimistic: challenge every hop over its whole history (one forward each)."""
        verdict = Verdict()
        for record in hops:
            await self._audit(record, step, slice(None), 1, candidates, forward, verdict)
        return verdict

    def _unchecked(self, layers: LayerRange) -> None:
        """No other peer could re-run ``layers``: counted apart, and said once per range."""
        self.unchecked += 1
        if layers not in self.unchecked_ranges:
            self.unchecked_ranges.add(layers)
            log.warning(
                "%s cannot check layers %s: no other server serves them (add a replica)",
                self.policy,
                layers,
            )

    async def _audit(
        self,
        record: HopRecord,
        step: int,
        checked: slice,
        checkers: int,
        candidates: CandidatesFn,
        forward: ForwardFn,
        verdict: Verdict,
    ) -> None:
        banned = self.reputation.banned()
        cands = [c for c in await candidates(record.layers) if c.peer_id not in banned]
        result = await audit_hop(
            record, cands, forward, checked=checked, checkers=checkers, rng=self.rng
        )
        if result.verdict is AuditVerdict.UNCHECKED:
            self._unchecked(record.layers)
            return
        self.audits += 1
        self.reruns += result.reruns
        self.rerun_tokens += result.reruns * record.inputs.shape[1]
        verdict.results.append(result)
        for peer in result.honest:
            self.reputation.record_audit(peer, True)
        if result.verdict is AuditVerdict.PASSED:
            self.norms.observe(record.layers, float(record.outputs.norm(dim=-1).mean()))
        lied = result.verdict is AuditVerdict.LIED
        digest = await self.reporter.report(record, result) if lied and self.reporter else None
        for peer in result.liars:
            self.reputation.record_audit(peer, False)
            self.reputation.ban(peer, digest if peer == record.peer_id else None)
            if self.ledger is not None and digest is not None and peer == record.peer_id:
                self.ledger.slash(peer, digest)
            verdict.banned.append(peer)
            self.detections.append((peer, step))
            log.warning("peer %s lied on layers %s at step %d", peer, record.layers, step)
        if lied and result.first_bad_position is not None:
            q = result.first_bad_position
            old = verdict.rollback_position
            verdict.rollback_position = q if old is None else min(old, q)
