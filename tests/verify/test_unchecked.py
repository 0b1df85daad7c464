"""A policy that has nobody to check with says so once, and does not count audits it could
not run (before: "72 audits" with a single server per range)."""

from __future__ import annotations

import logging
import random

import pytest
import torch

from swarm.identity import Identity
from swarm.types import LayerRange
from swarm.verify import HopObservation, HopRecord, Verifier, parse_policy


async def test_no_second_server_is_said_once_and_not_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="swarm.verify")
    peer = Identity.from_seed(b"only").peer_id
    verifier = Verifier(parse_policy("spot-check:1.0"), rng=random.Random(0))

    async def nobody(layers: LayerRange) -> list[object]:
        return []

    async def never(*args: object) -> torch.Tensor:
        raise AssertionError("no forward without candidates")

    for step in range(12):
        x = torch.randn(1, step + 1, 8)
        record = HopRecord(peer, "float32", LayerRange(0, 4), x, torch.arange(step + 1)[None], x)
        observed = [HopObservation(record, 1, 0.01, 100.0)]
        await verifier.check_step(observed, step, nobody, never)  # type: ignore[arg-type]
    stats = verifier.statistics()
    assert stats.audits == 0 and stats.unchecked == 12
    assert stats.unchecked_ranges == ("0:4",)
    assert caplog.text.count("cannot check layers 0:4") == 1
