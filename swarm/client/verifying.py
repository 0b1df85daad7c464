"""`VerifiedSessions`: a model's chains with its verification policy applied.

The glue between `Chain` (hops, the `StepResult` of each step) and `swarm.verify` (which
decides, votes and remembers). `VerifiedSessions` is shared by a client's generations: it
opens chains that avoid banned peers, lists the servers that can re-run a hop, runs stateless
forwards on them, and saves reputation. Each generation gets its own `CheckedChain`: its
chain, under ``redundant:K`` its replicas, and the checks of its steps. Proven lies become
signed evidence in the verifier's `EvidenceReporter`, published through the
``evidence_sink`` it is given (the DHT's `DHTEvidenceBoard` when the client has a DHT;
material kept in ``evidence_dir``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from pathlib import Path

import torch
import trio

from swarm.client.bans import BanList
from swarm.client.chain import Chain, HopStep, StepResult
from swarm.client.config import ClientConfig
from swarm.client.discovery import ServerDirectory
from swarm.client.replicas import Replicas
from swarm.directory import ServerView
from swarm.errors import SwarmError
from swarm.net.messages import Evidence, ForwardRequest
from swarm.net.pool import ConnectionPool
from swarm.net.surface import call_forward, call_info
from swarm.types import LayerRange, PeerId, ServerState, parse_address
from swarm.verify import (
    Candidate,
    EvidenceReporter,
    EvidenceSink,
    FileLedger,
    HopObservation,
    HopRecord,
    PolicyKind,
    Reputation,
    Verifier,
)

__all__ = ["CheckedChain", "VerifiedSessions", "load_reputation", "make_verifier"]

log = logging.getLogger(__name__)

RECHECK_SECONDS = 30.0
"""How often at most `VerifiedSessions.candidates` reads the directory again for layers that
only one server seemed to serve. The read runs in the audit, so in the token loop: a range
that really has no replica costs one directory read (a DHT lookup and pings) per period."""


def make_verifier(
    config: ClientConfig, sink: EvidenceSink | None = None, reputation: Reputation | None = None
) -> Verifier | None:
    """The verifier of ``config.verify`` (None under ``none``), reporting lies to ``sink``;
    it keeps its record in ``reputation`` (default: loaded from
    ``config.records.reputation_path``)."""
    policy = config.policy
    if policy.kind is PolicyKind.NONE:
        return None
    if reputation is None:
        reputation = load_reputation(config)
    ledger = FileLedger(config.records.ledger_path) if config.records.ledger_path else None
    evidence_dir = (
        Path(config.records.evidence_dir) if config.records.evidence_dir is not None else None
    )
    reporter = EvidenceReporter(config.identity, evidence_dir, sink)
    return Verifier(
        policy, reputation, ledger, rng=random.Random(config.records.seed), reporter=reporter
    )


def load_reputation(config: ClientConfig) -> Reputation:
    """The reputation kept at ``config.records.reputation_path`` (in memory when None)."""
    path = (
        Path(config.records.reputation_path).expanduser()
        if config.records.reputation_path
        else None
    )
    return Reputation.load(path) if path is not None else Reputation()


class VerifiedSessions:
    """Sessions of one model under ``config.verify`` (no checks at all under ``none``).

    ``reputation``: the record to share with other `VerifiedSessions` of the same client
    (per-generation policies); loaded from ``config.records.reputation_path`` when None. Peers it
    bans are left out of routes under every policy, ``none`` included.
    """

    def __init__(
        self,
        config: ClientConfig,
        pool: ConnectionPool,
        directory: ServerDirectory,
        bans: BanList,
        rng: random.Random,
        num_layers: int,
        evidence_sink: EvidenceSink | None = None,
        reputation: Reputation | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.directory = directory
        self.bans = bans
        self.rng = rng
        self.num_layers = num_layers
        self.verifier = make_verifier(config, evidence_sink, reputation)
        self._reputation = reputation
        self._dtypes: dict[PeerId, str] = {}
        self._views: dict[PeerId, ServerView] = {}
        self._rechecked = -math.inf  # when `candidates` last read the directory again

    @property
    def published_evidence(self) -> list[Evidence]:
        """Evidence this client signed against proven liars, in order."""
        reporter = self.verifier.reporter if self.verifier is not None else None
        return list(reporter.published) if reporter is not None else []

    def save_reputation(self) -> None:
        assert self.verifier is not None
        try:
            self.verifier.reputation.save()
        except OSError as exc:
            log.warning("could not save reputation: %s", exc)

    async def dtype(self, view: ServerView) -> str:
        """The numerics a server computes with: its dtype, plus the quantization when that
        changed the weights ("float32+int8"); asked once with ``info``; "" if it does not say."""
        if view.peer_id not in self._dtypes:
            host, port = parse_address(view.address)
            try:
                conn = await self.pool.get(host, port, view.peer_id)
                info = await call_info(conn, timeout=self.config.request_timeout)
                self._dtypes[view.peer_id] = info.numerics or info.dtype
            except SwarmError as exc:
                log.info("info from %s failed: %s", view.peer_id, exc)
                return ""
        return self._dtypes[view.peer_id]

    async def candidates(self, layers: LayerRange) -> list[Candidate]:
        """Online, unbanned servers whose span holds ``layers``.

        With fewer than two (nobody to check the one that served them), the directory is
        read again first, at most every `RECHECK_SECONDS`: the list a generation opened
        with may predate a replica's announcement, or a lookup may have missed its record,
        and a hop that nobody can check is a hop whose lies go unseen."""
        out = await self._inside(await self.directory.servers(), layers)
        now = trio.current_time()
        if len(out) < 2 and now - self._rechecked >= RECHECK_SECONDS:
            self._rechecked = now
            try:
                out = await self._inside(await self.directory.servers(refresh=True), layers)
            except SwarmError as exc:  # the list we had stands
                log.info("reading the directory again for layers %s failed: %s", layers, exc)
        return out

    async def _inside(self, views: Sequence[ServerView], layers: LayerRange) -> list[Candidate]:
        banned = self.bans.banned()
        out = []
        for view in views:
            self._views[view.peer_id] = view
            inside = view.layers.start <= layers.start and layers.stop <= view.layers.stop
            if inside and view.state == ServerState.ONLINE and view.peer_id not in banned:
                out.append(Candidate(view.peer_id, await self.dtype(view)))
        return out

    async def forward(
        self, peer: PeerId, layers: LayerRange, hidden: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """A stateless forward of ``layers`` on ``peer``. Raises `SwarmError` subclasses."""
        host, port = parse_address(self._views[peer].address)
        request = ForwardRequest(hidden.to(self.config.torch_wire_dtype), positions, layers)
        conn = await self.pool.get(host, port, peer)
        response = await call_forward(conn, request, timeout=self.config.step_timeout)
        return response.hidden_states.float()  # (batch, seq, hidden)

    def for_generation(self) -> Verifier | None:
        """A verifier for one generation: the shared policy, reputation, stake, evidence
        reporter and norms, and counts of its own (audits, detections: its
        ``statistics()``); `fold` adds them to the client's when the generation ends."""
        if self.verifier is None:
            return None
        own = dataclasses.replace(self.verifier, detections=[], unchecked_ranges=set())
        own.audits = own.reruns = own.rerun_tokens = own.unchecked = 0
        return own

    def fold(self, own: Verifier | None) -> None:
        """Add a generation's counts (from `for_generation`) to the client's verifier."""
        shared = self.verifier
        if own is None or shared is None or own is shared:
            return
        shared.audits += own.audits
        shared.reruns += own.reruns
        shared.rerun_tokens += own.rerun_tokens
        shared.detections += own.detections
        shared.unchecked += own.unchecked
        shared.unchecked_ranges |= own.unchecked_ranges

    @asynccontextmanager
    async def open(
        self, max_length: int, verifier: Verifier | None = None
    ) -> AsyncIterator[CheckedChain]:
        """One generation's chain (and under ``redundant:K`` its hops' K-1 replicas), with
        the checks that belong to that generation alone, counted by ``verifier`` (from
        `for_generation`; default: the client's own)."""
        layers = LayerRange(0, self.num_layers)
        record = self.verifier.reputation if self.verifier is not None else self._reputation
        excluded = record.banned() if record is not None else set()  # proven liars, any policy

        def open_range(
            span: LayerRange, avoid: Collection[PeerId]
        ) -> AbstractAsyncContextManager[Chain]:
            return Chain.open(
                self.pool,
                self.directory,
                self.config,
                layers=span,
                max_length=max_length,
                bans=self.bans,
                rng=self.rng,
                excluded=excluded | set(avoid),
            )

        async with AsyncExitStack() as stack:
            chain = await stack.enter_async_context(open_range(layers, ()))
            replicas = None
            if self.verifier is not None and self.verifier.policy.kind is PolicyKind.REDUNDANT:
                replicas = Replicas(open_range, stack)
                await replicas.open_for(chain, self.verifier.policy.replicas - 1)
            yield CheckedChain(self, chain, replicas, verifier or self.verifier)


class CheckedChain:
    """One generation's chain and its verification state (its replicas under
    ``redundant:K``), checked from the `StepResult` s it is given; only the verifier's
    reputation and bans are shared with other generations (through ``shared``). Made by
    `VerifiedSessions.open`; one per generation, never shared by concurrent ones."""

    def __init__(
        self,
        shared: VerifiedSessions,
        chain: Chain,
        replicas: Replicas | None,
        verifier: Verifier | None = None,
    ) -> None:
        self.shared = shared
        self.chain = chain
        self.replicas = replicas
        self.verifier = verifier

    async def _forward(
        self, peer: PeerId, layers: LayerRange, hidden: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """A stateless forward on ``peer`` (or a replica's recorded answer, which holds the
        same computation). Raises `SwarmError` subclasses."""
        if self.replicas is not None:
            answer = self.replicas.answer(peer, layers, hidden.shape[1])
            if answer is not None:
                return answer  # (batch, T, hidden)
        return await self.shared.forward(peer, layers, hidden, positions)

    async def _record(self, hop: HopStep) -> HopRecord:
        x, pos, out = hop.history.tensors()  # built here, when a check needs them
        replicas = tuple(self.replicas.peers(hop.hop.layers)) if self.replicas else ()
        return HopRecord(
            peer_id=hop.hop.server.peer_id,
            dtype=await self.shared.dtype(hop.hop.server),
            layers=hop.hop.layers,
            inputs=x,
            positions=pos,
            outputs=out,
            receipt=hop.receipt,
            step_tokens=hop.new_tokens,
            replicas=replicas,
        )

    async def check_step(self, result: StepResult) -> int | None:
        """Spot-check / redundant after one step; the position to roll back to, if any."""
        verifier = self.verifier
        if verifier is None or not verifier.policy.checks_steps:
            return None
        if self.replicas is not None:
            await self.replicas.step(result)
        observed = []
        for hop in result.hops:
            record = await self._record(hop)
            throughput = hop.hop.server.throughput
            observed.append(HopObservation(record, hop.new_tokens, hop.seconds, throughput))
        candidates = self.shared.candidates
        verdict = await verifier.check_step(observed, result.step, candidates, self._forward)
        return verdict.rollback_position

    async def challenge(self, result: StepResult) -> int | None:
        """Optimistic: challenge every hop over its whole history (up to ``result``'s step)
        before the generation returns."""
        verifier = self.verifier
        if verifier is None or verifier.policy.kind is not PolicyKind.OPTIMISTIC:
            return None
        records = [await self._record(hop) for hop in result.hops]
        candidates = self.shared.candidates
        verdict = await verifier.check_session(records, result.step, candidates, self._forward)
        return verdict.rollback_position
