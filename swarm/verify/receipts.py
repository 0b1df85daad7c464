"""Receipts (a server's signed statement of one step) and evidence (a reporter's signed claim
that a receipt was a lie), and the checks anyone can run on them.

A `Receipt` binds the server's Ed25519 key (whose SHA-256 is its `PeerId`) to: model id,
layer range, session id (``b""`` for a stateless forward), step, and the SHA-256 of the input
and output tensors (`tensor_digest`: dtype, shape and raw little-endian bytes, exactly as sent
on the wire). Servers attach one to every ``InferenceStepResult`` and ``ForwardResponse``.

`Evidence` is what a client publishes when a majority of re-runs contradicts a receipt: the
receipt itself, the SHA-256 of the hop's whole input history (inputs and positions, since the
step's output depends on the KV state built from them), the first lying token position, the
SHA-256 of the majority's output at the receipt's step, and the reporter's key and signature.
It is small (about 600 bytes encoded) so it fits a DHT record (≤ 1200 bytes) under
``"<model_id>/evidence"`` with the reporter as subkey. The full input history does not fit:
the reporter keeps it in a local evidence file (`EvidenceFile`, one ``.pt`` per evidence,
named by the evidence digest) to hand to anyone who wants to re-run it. `check_evidence`
checks the signatures and, given that file and a span, re-runs the history and confirms the
lie; forged receipts and forged or false evidence are rejected with `VerificationError`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgpack
import torch

from swarm.errors import ProtocolError, VerificationError
from swarm.identity import Identity, verify_signature
from swarm.net.messages import Evidence, Receipt, decode_message, encode_message
from swarm.types import LayerRange, PeerId
from swarm.verify.compare import Thresholds, compare

__all__ = [
    "Evidence",
    "EvidenceFile",
    "check_receipt",
    "confirm_evidence",
    "decode_evidence",
    "evidence_digest",
    "history_digest",
    "make_evidence",
    "make_receipt",
    "tensor_digest",
    "verify_evidence_signature",
]

_RECEIPT_TAG = b"swarm-receipt-v1\0"
_EVIDENCE_TAG = b"swarm-evidence-v1\0"


def tensor_digest(tensor: torch.Tensor) -> bytes:
    """SHA-256 of a tensor's dtype, shape and raw bytes (contiguous, little-endian)."""
    t = tensor.detach().cpu().contiguous()
    head = f"{str(t.dtype).removeprefix('torch.')}:{list(t.shape)}".encode()
    return hashlib.sha256(head + t.view(torch.uint8).numpy().tobytes()).digest()


def _receipt_bytes(r: Receipt) -> bytes:
    fields = [
        r.model_id,
        r.layer_range.start,
        r.layer_range.stop,
        r.session_id,
        r.step,
        r.input_sha256,
        r.output_sha256,
        r.public_key,
    ]
    packed: bytes = msgpack.packb(fields)
    return _RECEIPT_TAG + packed


def make_receipt(
    identity: Identity,
    model_id: str,
    layers: LayerRange,
    session_id: bytes,
    step: int,
    inputs: torch.Tensor,
    outputs: torch.Tensor,
) -> Receipt:
    """Sign a receipt for one computation (server side)."""
    fields = (
        model_id,
        layers,
        session_id,
        step,
        tensor_digest(inputs),
        tensor_digest(outputs),
        identity.public_key,
    )
    signature = identity.sign(_receipt_bytes(Receipt(*fields, b"")))
    return Receipt(*fields, signature)


def check_receipt(
    receipt: Receipt | None,
    peer: PeerId,
    *,
    layers: LayerRange | None = None,
    step: int | None = None,
    outputs: torch.Tensor | None = None,
    model_id: str | None = None,
) -> None:
    """Check a receipt against what the client knows. Raises `VerificationError` naming the
    first thing that does not hold (missing, wrong key, bad signature, other step/range/output).
    """
    if receipt is None:
        raise VerificationError("no receipt")
    if PeerId.from_public_key(receipt.public_key) != peer:
        raise VerificationError(f"receipt signed by a key that is not {peer}'s")
    if not verify_signature(receipt.public_key, receipt.signature, _receipt_bytes(receipt)):
        raise VerificationError("receipt signature does not verify")
    if layers is not None and receipt.layer_range != layers:
        raise VerificationError(f"receipt for layers {receipt.layer_range}, expected {layers}")
    if step is not None and receipt.step != step:
        raise VerificationError(f"receipt for step {receipt.step}, expected {step}")
    if model_id is not None and receipt.model_id != model_id:
        raise VerificationError(f"receipt for model {receipt.model_id!r}")
    if outputs is not None and receipt.output_sha256 != tensor_digest(outputs):
        raise VerificationError("receipt's output hash is not the output received")


def _evidence_bytes(e: Evidence) -> bytes:
    body = [
        encode_message(e.receipt),
        e.history_sha256,
        e.first_bad_position,
        e.reference_sha256,
        e.checkers,
        e.reporter_key,
    ]
    packed: bytes = msgpack.packb(body)
    return _EVIDENCE_TAG + packed


def history_digest(inputs: torch.Tensor, positions: torch.Tensor) -> bytes:
    return hashlib.sha256(tensor_digest(inputs) + tensor_digest(positions)).digest()


def make_evidence(
    reporter: Identity,
    receipt: Receipt,
    inputs: torch.Tensor,
    positions: torch.Tensor,
    first_bad_position: int,
    reference_step_output: torch.Tensor,
    checkers: int,
) -> Evidence:
    """Sign evidence against ``receipt`` (client side)."""
    unsigned = Evidence(
        receipt,
        history_digest(inputs, positions),
        first_bad_position,
        tensor_digest(reference_step_output),
        checkers,
        reporter.public_key,
        b"",
    )
    signature = reporter.sign(_evidence_bytes(unsigned))
    return Evidence(**{**unsigned.__dict__, "signature": signature})


def evidence_digest(evidence: Evidence) -> str:
    """Hex SHA-256 of the encoded evidence (its name in files, reputation and ledgers)."""
    return hashlib.sha256(encode_message(evidence)).hexdigest()


def decode_evidence(data: bytes) -> Evidence:
    """Decode evidence bytes. Raises `VerificationError` for anything malformed."""
    try:
        evidence: Evidence = decode_message(data, Evidence)
        return evidence
    except ProtocolError as exc:
        raise VerificationError(f"malformed evidence: {exc}") from exc


def verify_evidence_signature(evidence: Evidence) -> PeerId:
    """Check the reporter's and the accused's signatures; returns the accused's `PeerId`.

    Raises `VerificationError` for a forged receipt or forged evidence.
    """
    if not verify_signature(evidence.reporter_key, evidence.signature, _evidence_bytes(evidence)):
        raise VerificationError("evidence signature does not verify")
    accused = PeerId.from_public_key(evidence.receipt.public_key)
    check_receipt(evidence.receipt, accused)
    return accused


@dataclass(frozen=True)
class EvidenceFile:
    """The full material behind one evidence: history, positions, the accused's step output."""

    inputs: torch.Tensor  # (batch, history, hidden)
    positions: torch.Tensor  # (batch, history)
    step_inputs: torch.Tensor  # (batch, new, hidden) exactly as the receipt hashed them
    step_outputs: torch.Tensor  # (batch, new, hidden) exactly as the accused returned them

    def save(self, folder: Path, evidence: Evidence) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{evidence_digest(evidence)}.pt"
        torch.save(self.__dict__, path)
        return path

    @classmethod
    def load(cls, path: Path) -> EvidenceFile:
        data = torch.load(path, weights_only=True)
        return cls(**data)


def confirm_evidence(
    evidence: Evidence,
    material: EvidenceFile,
    rerun: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    thresholds: Thresholds,
) -> PeerId:
    """Check evidence completely: signatures, that the material is what was signed, and that
    re-running the history (``rerun(inputs, positions)`` on an honest copy of the layers)
    contradicts the receipt's output. Returns the proven liar.

    Raises `VerificationError` for forged signatures, material that does not match the
    hashes, or a re-run that agrees with the receipt (false evidence against an honest peer).
    """
    accused = verify_evidence_signature(evidence)
    receipt = evidence.receipt
    if history_digest(material.inputs, material.positions) != evidence.history_sha256:
        raise VerificationError("the evidence material is not the history that was signed")
    if tensor_digest(material.step_outputs) != receipt.output_sha256:
        raise VerificationError("the evidence material is not the output the receipt signed")
    n = material.step_outputs.shape[1]
    redone = rerun(material.inputs, material.positions)[:, -n:]  # (batch, n, hidden)
    if compare(redone.float(), material.step_outputs.float(), thresholds).ok:
        raise VerificationError("re-running the history agrees with the receipt: no lie")
    return accused
