"""Policy strings, reputation persistence and ban decay, stake, suspicion."""

from __future__ import annotations

from pathlib import Path

import pytest

from swarm.client.config import ClientConfig
from swarm.client.remote import RemoteModel
from swarm.errors import ConfigError
from swarm.identity import Identity
from swarm.types import LayerRange
from swarm.verify.ledger import FileLedger
from swarm.verify.policy import VerifyPolicy, parse_policy
from swarm.verify.reputation import PeerRecord, Reputation
from swarm.verify.suspicion import NormStats, audit_rate, too_fast

PEER = Identity.from_seed(b"peer").peer_id


def test_policies_parse_and_print() -> None:
    assert parse_policy(None) == parse_policy("none") == VerifyPolicy()
    assert parse_policy("spot-check:0.1") == VerifyPolicy("spot-check", rate=0.1)
    assert parse_policy("redundant:3").replicas == 3
    assert str(parse_policy("optimistic")) == "optimistic"
    assert str(parse_policy("spot-check:0.25")) == "spot-check:0.25"
    for bad in ("spot-check", "spot-check:2", "redundant:x", "redundant:0", "zk", "none:1"):
        with pytest.raises(ConfigError):
            parse_policy(bad)
    with pytest.raises(ConfigError):
        ClientConfig(verify="sometimes")
    with pytest.raises(ConfigError):
        RemoteModel.from_pretrained("/nonexistent", ["127.0.0.1:1"], verify="bogus")


def test_reputation_persists_and_bans_decay_unless_renewed(tmp_path: Path) -> None:
    now = [1000.0]
    path = tmp_path / "sub" / "rep.json"
    rep = Reputation.load(path, clock=lambda: now[0])
    rep.record_audit(PEER, True)
    assert rep.ban(PEER, evidence="abc") == 3600.0
    rep.save()
    again = Reputation.load(path, clock=lambda: now[0])
    assert again.is_banned(PEER) and again.banned() == {PEER}
    assert again.record(PEER).passed == 1 and again.record(PEER).evidence == ["abc"]
    now[0] += 3601
    assert not again.is_banned(PEER)  # decayed
    assert again.ban(PEER) == 7200.0  # renewed, longer
    assert again.is_banned(PEER)
    path.write_text("{not json")
    assert Reputation.load(path).records() == {}  # corrupt file: start over, do not crash


def test_file_ledger_slashes_once_per_evidence(tmp_path: Path) -> None:
    ledger = FileLedger(tmp_path / "ledger.json")
    ledger.deposit(PEER, 500.0)
    assert FileLedger(tmp_path / "ledger.json").stake_of(PEER) == 500.0
    assert ledger.slash(PEER, "ev1", 0.5) == 250.0
    assert ledger.slash(PEER, "ev1", 0.5) == 0.0  # replayed evidence
    assert FileLedger(tmp_path / "ledger.json").stake_of(PEER) == 250.0
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ConfigError):
        FileLedger(tmp_path / "bad.json")


def test_audit_rate_rises_with_suspicion_and_falls_with_stake_and_history() -> None:
    base = 0.1
    new, clean = PeerRecord(), PeerRecord(passed=200)
    assert audit_rate(base, new) == pytest.approx(0.2)
    assert audit_rate(base, PeerRecord(passed=10, failed=1)) == 0.5
    assert audit_rate(base, clean, outlier=True) == 1.0
    assert audit_rate(base, clean) < audit_rate(base, PeerRecord(passed=3)) <= base
    assert audit_rate(base, PeerRecord(passed=3), stake=1000.0) == pytest.approx(base * 0.25)
    assert audit_rate(base, clean, fast=True) == pytest.approx(2 * base)
    assert too_fast(0.001, 10, throughput=100.0, fraction=0.2)
    assert not too_fast(0.5, 10, throughput=100.0, fraction=0.2)


def test_norm_stats_flag_outliers_after_enough_samples() -> None:
    stats, layers = NormStats(), LayerRange(0, 4)
    assert stats.is_outlier(layers, 0.0) and stats.is_outlier(layers, float("nan"))
    assert not stats.is_outlier(layers, 100.0)  # nothing seen yet
    for i in range(10):
        stats.observe(layers, 10.0 + 0.1 * i)
    assert not stats.is_outlier(layers, 10.5)
    assert stats.is_outlier(layers, 100.0) and stats.is_outlier(layers, 1.0)
