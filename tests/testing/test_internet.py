"""The internet simulation at a small size (`swarm.testing.internet`, `benchmarks/internet.py`):
logical outcomes only (lookups find records, coverage healed, clients finish), never its
wall-clock figures, which depend on how busy the machine is."""

from __future__ import annotations

import pytest
import trio

from swarm.testing.internet import Failure, ServerKind, SimConfig, run_simulation

pytestmark = pytest.mark.slow  # about a minute of real DHT traffic on loopback


async def test_a_small_swarm_under_churn_heals_and_serves() -> None:
    config = SimConfig(
        dht_nodes=40, servers=8, blocks=6, clients=2, period=5.0, ttl=10.0, duration=40.0,
        mass_leave_at=12.0, mass_leave_gap=True, churn_per_minute=0.5, seed=1, heal_grace=150.0,
        slow_share=0.4, relayed_share=0.2,
    )  # fmt: skip
    with trio.fail_after(330):
        report = await run_simulation(config)
    summary = report.summary()
    assert report.lookup_seconds, "no lookup finished"
    assert summary["recall"] > 0.3  # lookups find live servers' records (1.0 on an idle machine)
    # the departure left a block without a server; rebalancing covered it again
    assert summary["max_blocks_uncovered"] > 0
    assert report.heal_seconds is not None, report.uncovered
    assert report.uncovered[-1][1] == 0, report.uncovered
    assert report.succeeded > 0  # clients finished generations through the churn
    # with the product's failure policy (bans, 8 recoveries, waiting for a route), a client
    # never gives up for re-planning onto dead servers' records over and over
    assert Failure.GAVE_UP not in report.failures, report.failures
    # servers count in the balance with what their peers measured them delivering: never
    # more than they announce, and slow ones, once measured, less
    rows = report.throughput
    assert any(row["measured_by_peers"] for row in rows.values()), rows
    for row in rows.values():
        assert row["counted"] <= row["announced"] + 1e-6, rows
    slow = rows.get(ServerKind.SLOW)
    if slow is not None and slow["measured_by_peers"]:
        assert slow["counted"] < slow["announced"], rows
    assert summary["dht_datagrams_per_node_minute"] > 0
