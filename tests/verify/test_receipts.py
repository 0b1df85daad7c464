"""Receipts and evidence: honest ones check out; forged or false ones are rejected."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from swarm.errors import VerificationError
from swarm.identity import Identity
from swarm.net.messages import Evidence, encode_message
from swarm.shards import load_span
from swarm.testing.adversaries import corruptor
from swarm.types import LayerRange
from swarm.verify.compare import thresholds_for
from swarm.verify.receipts import (
    EvidenceFile,
    check_receipt,
    confirm_evidence,
    decode_evidence,
    make_evidence,
    make_receipt,
    verify_evidence_signature,
)

SERVER = Identity.from_seed(b"server")
REPORTER = Identity.from_seed(b"reporter")
LAYERS = LayerRange(0, 4)
F32 = thresholds_for("float32", "float32")


def run_span(path: Path, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = load_span(path, LAYERS)(x, pos, None)  # (1, seq, hidden)
    return out


def history(seq: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(1, seq, 64, generator=torch.Generator().manual_seed(0))  # (1, seq, 64)
    return x, torch.arange(seq).view(1, seq)


def test_honest_receipt_checks_out_and_tampering_is_rejected() -> None:
    x, out = torch.randn(1, 1, 64), torch.randn(1, 1, 64)
    receipt = make_receipt(SERVER, "m", LAYERS, b"s" * 16, 3, x, out)
    check_receipt(receipt, SERVER.peer_id, layers=LAYERS, step=3, outputs=out, model_id="m")
    with pytest.raises(VerificationError, match="no receipt"):
        check_receipt(None, SERVER.peer_id)
    with pytest.raises(VerificationError, match="signature"):
        check_receipt(dataclasses.replace(receipt, step=4), SERVER.peer_id)
    with pytest.raises(VerificationError, match="signature"):
        check_receipt(dataclasses.replace(receipt, output_sha256=b"\0" * 32), SERVER.peer_id)
    with pytest.raises(VerificationError, match="output"):
        check_receipt(receipt, SERVER.peer_id, outputs=out + 1)
    with pytest.raises(VerificationError, match="step"):
        check_receipt(receipt, SERVER.peer_id, step=2)
    forged = make_receipt(REPORTER, "m", LAYERS, b"s" * 16, 3, x, out)  # signed by someone else
    with pytest.raises(VerificationError, match="key"):
        check_receipt(forged, SERVER.peer_id)
    with pytest.raises(VerificationError, match="signature"):  # claims the key, cannot sign
        check_receipt(dataclasses.replace(forged, public_key=SERVER.public_key), SERVER.peer_id)


def lie_and_evidence(model4: Path, spec: str) -> tuple[Evidence, EvidenceFile]:
    x, pos = history()
    honest = run_span(model4, x, pos)
    lied = corruptor(spec, seed=1)(x, honest) if spec != "honest" else honest
    step_in, step_out = x[:, -1:], lied[:, -1:]
    receipt = make_receipt(SERVER, "m", LAYERS, b"s" * 16, 1, step_in, step_out)
    evidence = make_evidence(REPORTER, receipt, x, pos, 8, honest[:, -1:], 2)
    return evidence, EvidenceFile(x, pos, step_in, step_out)


def test_true_evidence_is_confirmed_by_anyone_who_reruns_it(model4: Path, tmp_path: Path) -> None:
    evidence, material = lie_and_evidence(model4, "noise:0.01")
    wire = decode_evidence(encode_message(evidence))
    assert len(encode_message(wire)) < 1000  # fits a DHT record with its envelope
    saved = material.save(tmp_path, wire)
    rerun = lambda x, p: run_span(model4, x, p)  # noqa: E731
    assert confirm_evidence(wire, EvidenceFile.load(saved), rerun, F32) == SERVER.peer_id


def test_forged_and_false_evidence_are_rejected(model4: Path) -> None:
    rerun = lambda x, p: run_span(model4, x, p)  # noqa: E731
    evidence, material = lie_and_evidence(model4, "zeros")
    tampered = dataclasses.replace(evidence, first_bad_position=0)
    with pytest.raises(VerificationError, match="evidence signature"):
        verify_evidence_signature(tampered)
    forged_receipt = dataclasses.replace(evidence.receipt, step=7)
    reforged = make_evidence(
        REPORTER, forged_receipt, material.inputs, material.positions, 8, material.step_outputs, 2
    )
    with pytest.raises(VerificationError, match="receipt signature"):
        verify_evidence_signature(reforged)
    other = EvidenceFile(
        material.inputs + 1, material.positions, material.step_inputs, material.step_outputs
    )
    with pytest.raises(VerificationError, match="history"):
        confirm_evidence(evidence, other, rerun, F32)
    framed, honest_material = lie_and_evidence(model4, "honest")  # an honest peer, accused
    with pytest.raises(VerificationError, match="agrees"):
        confirm_evidence(framed, honest_material, rerun, F32)
    with pytest.raises(VerificationError, match="malformed"):
        decode_evidence(b"\x81\xa1t\xa8evidence")
