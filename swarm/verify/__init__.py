"""swarm.verify: policies, hidden-state comparison, audits, receipts and evidence, reputation
and stake (DESIGN §8). Policy simulation (`swarm.testing.simulate`) is a
test and benchmark helper."""

from swarm.verify.audit import AuditResult, AuditVerdict, Candidate, HopRecord, audit_hop
from swarm.verify.compare import Comparison, Thresholds, compare, first_mismatch, thresholds_for
from swarm.verify.ledger import FileLedger, Ledger
from swarm.verify.policy import PolicyKind, VerifyPolicy, parse_policy
from swarm.verify.receipts import (
    EvidenceFile,
    check_receipt,
    confirm_evidence,
    decode_evidence,
    make_evidence,
    make_receipt,
    verify_evidence_signature,
)
from swarm.verify.reporting import EvidenceReporter, EvidenceSink
from swarm.verify.reputation import DEFAULT_REPUTATION_PATH, PeerRecord, Reputation
from swarm.verify.suspicion import NormStats, SuspicionConfig, audit_rate
from swarm.verify.verifier import HopObservation, Verdict, Verifier, VerifierStatistics

__all__ = [
    "DEFAULT_REPUTATION_PATH",
    "AuditResult",
    "AuditVerdict",
    "Candidate",
    "Comparison",
    "EvidenceFile",
    "EvidenceReporter",
    "EvidenceSink",
    "FileLedger",
    "HopObservation",
    "HopRecord",
    "Ledger",
    "NormStats",
    "PeerRecord",
    "PolicyKind",
    "Reputation",
    "SuspicionConfig",
    "Thresholds",
    "Verdict",
    "Verifier",
    "VerifierStatistics",
    "VerifyPolicy",
    "audit_hop",
    "audit_rate",
    "check_receipt",
    "compare",
    "confirm_evidence",
    "decode_evidence",
    "first_mismatch",
    "make_evidence",
    "make_receipt",
    "parse_policy",
    "thresholds_for",
    "verify_evidence_signature",
]
