"""Fast simulation of a policy over recorded outputs (tests and benchmarks).

Real outputs are computed once per span (`record_outputs`: the honest step-by-step outputs,
the honest whole-history forward, and the same for any other spans, e.g. other weights or
another dtype); `simulate_hop` then replays a generation of one hop through the real
`Verifier` (the same code the client runs), with the checked peer's answers rewritten by an
adversary and the checkers' forwards served from the recordings. It measures when the liar is
detected and where the generation would roll back, in milliseconds per trial.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from swarm.identity import Identity
from swarm.shards.cache import KVCache
from swarm.shards.span import Span
from swarm.types import LayerRange, PeerId
from swarm.verify.audit import Candidate, HopRecord
from swarm.verify.policy import VerifyPolicy
from swarm.verify.reputation import Reputation
from swarm.verify.suspicion import SuspicionConfig
from swarm.verify.verifier import HopObservation, Verifier

__all__ = ["Recording", "SimPeer", "TrialResult", "record_outputs", "simulate_hop"]

Corrupt = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Recording:
    """One span's answers for one input sequence: step by step, and whole-history forwards."""

    dtype: str
    steps: list[torch.Tensor]  # per step: (1, n_step, hidden) from the KV-cache path
    whole: torch.Tensor  # (1, seq, hidden): one forward of everything


def record_outputs(span: Span, x: torch.Tensor, chunks: list[int]) -> Recording:
    """Run ``x`` (1, seq, hidden) through ``span`` in ``chunks`` with a cache, and whole."""
    cache = KVCache.allocate(span.config, span.layers, 1, x.shape[1], dtype=span.dtype)
    steps, start = [], 0
    with torch.no_grad():
        for n in chunks:
            pos = torch.arange(start, start + n).view(1, n)  # (1, n)
            steps.append(span(x[:, start : start + n].to(span.dtype), pos, cache).float())
            start += n
        pos = torch.arange(x.shape[1]).view(1, -1)  # (1, seq)
        whole = span(x.to(span.dtype), pos, None).float()  # (1, seq, hidden)
    return Recording(str(span.dtype).removeprefix("torch."), steps, whole)


@dataclass(frozen=True)
class SimPeer:
    """A peer of the simulated swarm: its id and the recording it answers from."""

    peer_id: PeerId
    recording: Recording
    corrupt: Corrupt | None = None  # rewrites its answers (steps and forwards)
    liar: bool = False  # answers wrongly (set for a corrupt peer or one with other weights)

    @classmethod
    def make(
        cls, name: str, recording: Recording, corrupt: Corrupt | None = None, liar: bool = False
    ) -> SimPeer:
        peer = Identity.from_seed(name.encode()).peer_id
        return cls(peer, recording, corrupt, liar or corrupt is not None)


@dataclass
class TrialResult:
    detected_at: int | None  # step at which the checked peer was caught
    rollback_position: int | None
    checks: int  # audits run
    flagged_honest: int  # honest peers found lying (must stay 0)


async def simulate_hop(
    x: torch.Tensor,
    primary: SimPeer,
    checkers: list[SimPeer],
    policy: VerifyPolicy,
    *,
    seed: int,
    suspicion: SuspicionConfig | None = None,
    layers: LayerRange = LayerRange(0, 1),
) -> TrialResult:
    """Replay one hop's generation (the primary's recorded steps) under ``policy``."""
    verifier = Verifier(
        policy, Reputation(), rng=random.Random(seed), suspicion=suspicion or SuspicionConfig()
    )
    by_id = {p.peer_id: p for p in checkers}
    cands = [Candidate(p.peer_id, p.recording.dtype) for p in checkers]

    async def candidates(_: LayerRange) -> list[Candidate]:
        return cands

    async def forward(
        peer: PeerId, _: LayerRange, h: torch.Tensor, pos: torch.Tensor
    ) -> torch.Tensor:
        sim = by_id[peer]
        out = sim.recording.whole[:, : h.shape[1]]  # (1, T, hidden)
        return sim.corrupt(h, out) if sim.corrupt is not None else out

    outputs: list[torch.Tensor] = []
    honest = {p.peer_id for p in [*checkers, primary] if not p.liar}
    result = TrialResult(None, None, 0, 0)
    start = 0
    for step, out in enumerate(primary.recording.steps):
        n = out.shape[1]
        step_in = x[:, start : start + n]  # (1, n, hidden)
        outputs.append(primary.corrupt(step_in, out) if primary.corrupt is not None else out)
        start += n
        record = HopRecord(
            primary.peer_id,
            primary.recording.dtype,
            layers,
            x[:, :start],
            torch.arange(start).view(1, -1),
            torch.cat(outputs, dim=1),
        )
        if policy.kind == "optimistic":
            continue
        verdict = await verifier.check_step(
            [HopObservation(record, n, 1.0, 0.0)], step, candidates, forward
        )
        _tally(result, verdict.banned, honest, primary.peer_id, step, verdict.rollback_position)
        if result.detected_at is not None:
            break
    if policy.kind == "optimistic":
        verdict = await verifier.check_session([record], step, candidates, forward)
        _tally(result, verdict.banned, honest, primary.peer_id, step, verdict.rollback_position)
    result.checks = verifier.audits
    return result


def _tally(
    result: TrialResult,
    banned: list[PeerId],
    honest: set[PeerId],
    primary: PeerId,
    step: int,
    rollback: int | None,
) -> None:
    result.flagged_honest += sum(1 for p in banned if p in honest)
    if primary in banned and result.detected_at is None:
        result.detected_at = step
        result.rollback_position = rollback
