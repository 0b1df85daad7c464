"""Turning a proven lie into signed evidence, and handing it to whoever publishes it.

`swarm.verify` never reaches into the network on its own: the client passes an
`EvidenceSink` (in practice `swarm.directory.DHTEvidenceBoard`) to the `EvidenceReporter`,
which signs the evidence with the client's identity, keeps its material in a local folder if
one is given, and gives both to the sink.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from swarm.identity import Identity
from swarm.net.messages import Evidence
from swarm.verify.audit import AuditResult, AuditVerdict, HopRecord
from swarm.verify.material import encode_material
from swarm.verify.receipts import EvidenceFile, evidence_digest, make_evidence

__all__ = ["EvidenceReporter", "EvidenceSink"]


class EvidenceSink(Protocol):
    """Where signed evidence and its encoded material go (best effort, never raises)."""

    async def publish(
        self, model_id: str, digest: str, evidence: Evidence, material: bytes
    ) -> None: ...


@dataclass
class EvidenceReporter:
    """Signs evidence against liars; ``published`` lists what it signed, in order."""

    identity: Identity
    evidence_dir: Path | None = None
    sink: EvidenceSink | None = None
    published: list[Evidence] = field(default_factory=list)

    async def report(self, record: HopRecord, result: AuditResult) -> str | None:
        """Evidence against ``record``'s last receipt; returns its digest.

        None when there is nothing to sign: no lie, no receipt, or no reference output.
        """
        if (
            result.verdict is not AuditVerdict.LIED
            or record.receipt is None
            or result.reference is None
            or record.step_tokens == 0
        ):
            return None
        tail = slice(record.inputs.shape[1] - record.step_tokens, None)
        evidence = make_evidence(
            self.identity,
            record.receipt,
            record.inputs,
            record.positions,
            result.first_bad_position or 0,
            result.reference[:, tail],
            len(result.honest),
        )
        digest = evidence_digest(evidence)
        material = EvidenceFile(
            record.inputs, record.positions, record.inputs[:, tail], record.outputs[:, tail]
        )
        if self.evidence_dir is not None:
            material.save(self.evidence_dir.expanduser(), evidence)
        if self.sink is not None:
            await self.sink.publish(
                record.receipt.model_id, digest, evidence, encode_material(material)
            )
        self.published.append(evidence)
        return digest
