"""`VerifiedSessions`: a model's inference sessions with its verification policy applied.

The glue between `InferenceSession` (hops, per-hop histories, receipts) and `swarm.verify`
(which decides, votes and remembers): it opens sessions that avoid banned peers (and, under
``redundant:K``, their replicas), lists the servers that can re-run a hop, runs stateless
forwards on them, turns proven lies into signed evidence (published in the DHT, material
kept in ``evidence_dir``) and saves reputation.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Collection
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from pathlib import Path

import torch
import trio

from swarm.client.bans import BanList
from swarm.client.config import ClientConfig
from swarm.client.discovery import ServerDirectory
from swarm.client.replicas import Replicas
from swarm.client.routing import ServerView
from swarm.client.session import InferenceSession
from swarm.dht import DHTNode
from swarm.errors import SwarmError
from swarm.net.messages import (
    Evidence,
    ForwardRequest,
    ForwardResponse,
    InfoRequest,
    InfoResponse,
    encode_message,
)
from swarm.net.pool import ConnectionPool
from swarm.types import LayerRange, PeerId, parse_address
from swarm.verify.audit import AuditResult, Candidate, HopRecord
from swarm.verify.ledger import FileLedger
from swarm.verify.material import publish_material
from swarm.verify.policy import parse_policy
from swarm.verify.receipts import EvidenceFile, evidence_digest, make_evidence
from swarm.verify.reputation import Reputation
from swarm.verify.verifier import HopObservation, Verifier

__all__ = ["VerifiedSessions", "make_verifier"]

log = logging.getLogger(__name__)


def make_verifier(config: ClientConfig) -> Verifier | None:
    policy = parse_policy(config.verify)
    if policy.kind == "none":
        return None
    path = Path(config.reputation_path).expanduser() if config.reputation_path else None
    reputation = Reputation.load(path) if path is not None else Reputation()
    ledger = FileLedger(config.ledger_path) if config.ledger_path else None
    return Verifier(policy, reputation, ledger, rng=random.Random(config.verify_seed))


class VerifiedSessions:
    """Sessions of one model under ``config.verify`` (no checks at all under ``none``)."""

    def __init__(
        self,
        config: ClientConfig,
        pool: ConnectionPool,
        directory: ServerDirectory,
        bans: BanList,
        rng: random.Random,
        num_layers: int,
    ) -> None:
        self.config = config
        self.pool = pool
        self.directory = directory
        self.bans = bans
        self.rng = rng
        self.num_layers = num_layers
        self.verifier = make_verifier(config)
        self.published_evidence: list[Evidence] = []
        self._dtypes: dict[PeerId, str] = {}
        self._views: dict[PeerId, ServerView] = {}
        self._replicas: Replicas | None = None
        if self.verifier is not None:
            self.verifier.on_evidence = self._evidence

    def save_reputation(self) -> None:
        assert self.verifier is not None
        try:
            self.verifier.reputation.save()
        except OSError as exc:
            log.warning("could not save reputation: %s", exc)

    async def _dtype(self, view: ServerView) -> str:
        """The dtype a server computes in (asked once with ``info``; "" if it does not say)."""
        if view.peer_id not in self._dtypes:
            host, port = parse_address(view.address)
            try:
                info = await self.pool.call(
                    host, port, "info", InfoRequest(), InfoResponse,
                    expected_peer=view.peer_id, timeout=self.config.request_timeout,
                )  # fmt: skip
                self._dtypes[view.peer_id] = info.dtype
            except SwarmError as exc:
                log.info("info from %s failed: %s", view.peer_id, exc)
                return ""
        return self._dtypes[view.peer_id]

    async def _candidates(self, layers: LayerRange) -> list[Candidate]:
        """Online, unbanned servers whose span holds ``layers``."""
        banned = self.bans.banned()
        out = []
        for view in await self.directory.servers():
            self._views[view.peer_id] = view
            inside = view.layers.start <= layers.start and layers.stop <= view.layers.stop
            if inside and view.state == "online" and view.peer_id not in banned:
                out.append(Candidate(view.peer_id, await self._dtype(view)))
        return out

    async def _forward(
        self, peer: PeerId, layers: LayerRange, hidden: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """A stateless forward on ``peer`` (or a replica's recorded answer, which holds the
        same computation). Raises `SwarmError` subclasses."""
        if self._replicas is not None:
            answer = self._replicas.answer(peer, layers, hidden.shape[1])
            if answer is not None:
                return answer  # (batch, T, hidden)
        host, port = parse_address(self._views[peer].address)
        request = ForwardRequest(hidden.to(self.config.torch_wire_dtype), positions, layers)
        response = await self.pool.call(
            host, port, "forward", request, ForwardResponse,
            expected_peer=peer, timeout=self.config.step_timeout,
        )  # fmt: skip
        return response.hidden_states.float()  # (batch, seq, hidden)

    async def _hop_records(self, session: InferenceSession) -> list[HopRecord]:
        records = []
        for k, hop in enumerate(session.route):
            x, pos, out = session.hop_history(k)
            dtype = await self._dtype(hop.server)
            state = session.hops[k]
            step_tokens = state.inputs[-1][0].shape[1] if state.inputs else 0
            receipt = state.receipts[-1] if state.receipts else None
            replicas = tuple(self._replicas.peers(hop.layers)) if self._replicas else ()
            records.append(
                HopRecord(
                    hop.server.peer_id,
                    dtype,
                    hop.layers,
                    x,
                    pos,
                    out,
                    receipt,
                    step_tokens,
                    replicas,
                )
            )
        return records

    async def _evidence(self, record: HopRecord, result: AuditResult) -> str | None:
        """Sign evidence against the liar's last receipt, keep its material, publish it.

        Returns the evidence digest (None without a receipt). Publishing is best effort.
        """
        if record.receipt is None or result.reference is None or record.step_tokens == 0:
            return None
        tail = slice(record.inputs.shape[1] - record.step_tokens, None)
        evidence = make_evidence(
            self.config.identity,
            record.receipt,
            record.inputs,
            record.positions,
            result.first_bad_position or 0,
            result.reference[:, tail],
            len(result.honest),
        )
        digest = evidence_digest(evidence)
        if self.config.evidence_dir is not None:
            material = EvidenceFile(
                record.inputs, record.positions, record.inputs[:, tail], record.outputs[:, tail]
            )
            material.save(Path(self.config.evidence_dir).expanduser(), evidence)
        dht = getattr(self.directory, "dht", None)
        if isinstance(dht, DHTNode):
            model = record.receipt.model_id
            material = EvidenceFile(
                record.inputs, record.positions, record.inputs[:, tail], record.outputs[:, tail]
            )
            try:
                with trio.move_on_after(self.config.request_timeout):
                    await dht.announce(
                        f"{model}/evidence", {"evidence": encode_message(evidence)}, ttl=3600.0
                    )
                    await publish_material(dht, model, digest, material, ttl=3600.0)
            except SwarmError as exc:
                log.info("could not publish evidence: %s", exc)
        self.published_evidence.append(evidence)
        return digest

    async def check_step(self, session: InferenceSession, new_tokens: int, step: int) -> int | None:
        """Spot-check / redundant after one step; the position to roll back to, if any."""
        verifier = self.verifier
        if verifier is None or not verifier.policy.checks_steps:
            return None
        if self._replicas is not None:
            await self._replicas.step(session)
        observed = []
        for k, record in enumerate(await self._hop_records(session)):
            seconds = session.hops[k].seconds
            throughput = session.route[k].server.throughput
            observed.append(
                HopObservation(record, new_tokens, seconds[-1] if seconds else 1.0, throughput)
            )
        verdict = await verifier.check_step(observed, step, self._candidates, self._forward)
        return verdict.rollback_position

    async def challenge(self, session: InferenceSession, step: int) -> int | None:
        """Optimistic: challenge every hop over its whole history before returning."""
        verifier = self.verifier
        if verifier is None or verifier.policy.kind != "optimistic":
            return None
        records = await self._hop_records(session)
        verdict = await verifier.check_session(records, step, self._candidates, self._forward)
        return verdict.rollback_position

    @asynccontextmanager
    async def open(self, max_length: int) -> AsyncIterator[InferenceSession]:
        """The main session, and under ``redundant:K`` its hops' K-1 replicas."""
        layers = LayerRange(0, self.num_layers)
        excluded = self.verifier.reputation.banned() if self.verifier is not None else set()

        def open_range(
            span: LayerRange, avoid: Collection[PeerId]
        ) -> AbstractAsyncContextManager[InferenceSession]:
            return InferenceSession.open(
                self.pool, self.directory, self.config, layers=span, max_length=max_length,
                bans=self.bans, rng=self.rng, excluded=excluded | set(avoid),
            )  # fmt: skip

        async with AsyncExitStack() as stack:
            session = await stack.enter_async_context(open_range(layers, ()))
            if self.verifier is not None and self.verifier.policy.kind == "redundant":
                self._replicas = Replicas(open_range, stack)
                await self._replicas.open_for(session, self.verifier.policy.replicas - 1)
            try:
                yield session
            finally:
                self._replicas = None
