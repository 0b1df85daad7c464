"""Re-running a hop on other peers and voting: the core of every policy, network-agnostic.

The caller gives a `HopRecord` (the checked peer's whole input history for this hop and the
outputs it returned for it), the peers that could re-run it (`Candidate`), and a ``forward``
function that runs a stateless forward on one of them. `audit_hop` asks ``checkers`` peers
(same dtype first), compares every answer with every other at the checked positions, and
adds referees one at a time while no answer holds a strict majority. Everyone outside the
majority lied; for the checked peer it also finds the first position where its outputs leave
the majority's (the generation rolls back there).
"""

from __future__ import annotations

import enum
import itertools
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import torch

from swarm.errors import SwarmError
from swarm.net.messages import Receipt
from swarm.types import LayerRange, PeerId
from swarm.verify.compare import compare, first_mismatch, thresholds_for

__all__ = ["AuditResult", "AuditVerdict", "Candidate", "ForwardFn", "HopRecord", "audit_hop"]

log = logging.getLogger(__name__)

ForwardFn = Callable[[PeerId, LayerRange, torch.Tensor, torch.Tensor], Awaitable[torch.Tensor]]


class AuditVerdict(enum.StrEnum):
    """The outcome of one audit of one hop."""

    PASSED = "passed"  # the checked peer is in the majority
    LIED = "lied"  # a majority of re-runs contradicts it
    INCONCLUSIVE = "inconclusive"  # no majority with the peers available
    UNCHECKED = "unchecked"  # no other peer could re-run it


@dataclass(frozen=True)
class Candidate:
    peer_id: PeerId
    dtype: str


@dataclass(frozen=True)
class HopRecord:
    """One hop as the client saw it: who ran it, on what, and what came back."""

    peer_id: PeerId
    dtype: str
    layers: LayerRange
    inputs: torch.Tensor  # (batch, history, hidden): every input the peer was given
    positions: torch.Tensor  # (batch, history) int64
    outputs: torch.Tensor  # (batch, history, hidden): what the peer returned
    receipt: Receipt | None = None  # the peer's receipt for its last step
    step_tokens: int = 0  # positions of that last step (the tail of the history)
    replicas: tuple[PeerId, ...] = ()  # peers that replicate this hop: asked first


@dataclass
class AuditResult:
    """One audit's `AuditVerdict`, who agreed, who lied, and where the lie began."""

    verdict: AuditVerdict
    liars: list[PeerId] = field(default_factory=list)
    honest: list[PeerId] = field(default_factory=list)
    first_bad_position: int | None = None  # token position where the checked peer first lied
    reference: torch.Tensor | None = None  # (batch, history, hidden) the majority's output
    reruns: int = 0  # forwards asked of other peers


def _pick(
    cands: list[Candidate], dtype: str, rng: random.Random, first: tuple[PeerId, ...]
) -> Candidate:
    preferred = [c for c in cands if c.peer_id in first]
    same = [c for c in cands if c.dtype == dtype]
    choice = rng.choice(preferred or same or cands)
    cands.remove(choice)
    return choice


def _majority(
    answers: dict[PeerId, tuple[torch.Tensor, str]], checked: slice
) -> tuple[list[PeerId], list[PeerId]] | None:
    """(majority, liars): the largest set of pairwise-agreeing answers, if it is a strict
    majority and no other set of that size exists; liars are the peers that disagree with
    most of it. Agreement is not transitive across dtypes (a bfloat16 answer can be within
    tolerance of two float32 answers that disagree), hence cliques, not neighbourhoods."""
    peers = list(answers)
    agree = {
        (a, b): compare(
            answers[a][0][:, checked],
            answers[b][0][:, checked],
            thresholds_for(answers[a][1], answers[b][1]),
        ).ok
        for i, a in enumerate(peers)
        for b in peers[i + 1 :]
    }

    def ok(a: PeerId, b: PeerId) -> bool:
        return a == b or agree.get((a, b), agree.get((b, a), False))

    cliques = [
        group
        for size in range(len(peers), 0, -1)
        for group in itertools.combinations(peers, size)
        if all(ok(a, b) for a, b in itertools.combinations(group, 2))
    ]
    best = len(cliques[0])
    top = [g for g in cliques if len(g) == best]
    if 2 * best <= len(peers) or len(top) > 1:
        return None
    winner = list(top[0])
    liars = [p for p in peers if p not in winner and 2 * sum(ok(p, w) for w in winner) < best]
    return winner, liars


async def audit_hop(
    record: HopRecord,
    candidates: Sequence[Candidate],
    forward: ForwardFn,
    *,
    checked: slice = slice(None),
    checkers: int = 1,
    max_referees: int = 3,
    rng: random.Random | None = None,
) -> AuditResult:
    """Re-run ``record`` on ``checkers`` candidates (plus referees on a tie) and vote.

    A verdict needs a strict majority of pairwise-agreeing answers; while it is won by one
    vote and candidates remain, up to ``max_referees`` more are asked.

    ``checked`` selects the positions compared (the current step's, or all). A candidate whose
    forward fails is skipped. Never raises for a peer's misbehaviour; lets `trio.Cancelled` out.
    """
    rng = rng or random.Random()
    pool = [c for c in candidates if c.peer_id != record.peer_id]
    answers: dict[PeerId, tuple[torch.Tensor, str]] = {
        record.peer_id: (record.outputs, record.dtype)
    }
    result = AuditResult(AuditVerdict.UNCHECKED)
    wanted = checkers
    while pool:
        cand = _pick(pool, record.dtype, rng, record.replicas)
        result.reruns += 1
        try:
            ref = await forward(cand.peer_id, record.layers, record.inputs, record.positions)
        except SwarmError as exc:
            log.info("checker %s failed: %s", cand.peer_id, exc)
            continue
        if ref.shape != record.outputs.shape:
            log.info("checker %s answered shape %s", cand.peer_id, list(ref.shape))
            continue
        answers[cand.peer_id] = (ref.float(), cand.dtype)
        if len(answers) - 1 < wanted:
            continue
        vote = _majority(answers, checked)
        narrow = vote is not None and len(vote[0]) - len(vote[1]) < 2 and bool(pool)
        if vote is None or (narrow and wanted < checkers + max_referees):
            # a tie, or a one-vote majority that another referee may overturn (two
            # colluders must not ban an honest peer just by being two of three answers)
            if wanted >= checkers + max_referees:
                break
            wanted += 1
            continue
        return _verdict(record, answers, vote, result)
    if len(answers) > 1:
        result.verdict = AuditVerdict.INCONCLUSIVE
    return result


def _verdict(
    record: HopRecord,
    answers: dict[PeerId, tuple[torch.Tensor, str]],
    vote: tuple[list[PeerId], list[PeerId]],
    result: AuditResult,
) -> AuditResult:
    agreeing, liars = vote
    result.honest, result.liars = agreeing, liars
    ref_peer = next((p for p in agreeing if p != record.peer_id), agreeing[0])
    ref, ref_dtype = answers[ref_peer]
    result.reference = ref
    if record.peer_id in agreeing:
        result.verdict = AuditVerdict.PASSED
        return result
    if record.peer_id not in liars:  # outside the majority, but close to half of it
        result.verdict = AuditVerdict.INCONCLUSIVE
        return result
    result.verdict = AuditVerdict.LIED
    index = first_mismatch(ref, record.outputs.float(), thresholds_for(ref_dtype, record.dtype))
    if index is None:  # it lied only at positions outside `checked`? use the checked start
        index = 0
    result.first_bad_position = int(record.positions[0, index])
    return result
