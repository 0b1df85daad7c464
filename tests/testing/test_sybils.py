"""Junk-answering sybil DHT nodes in the internet simulation (`swarm.testing.sybils`): the
real records are still found, and no forged one is ever accepted; the swarm is split over
two processes (`swarm.testing.internet_workers`), so lookups cross them, and servers,
clients and probes act through the nodes of both (`swarm.testing.internet_ops`). Logical
outcomes only."""

from __future__ import annotations

import pytest
import trio

from swarm.testing.internet import SimConfig, run_simulation

pytestmark = pytest.mark.slow  # a worker process and ~20 s of DHT traffic on loopback


async def test_records_are_found_and_forgeries_refused_among_junk_answering_sybils() -> None:
    config = SimConfig(
        dht_nodes=30, servers=6, blocks=4, clients=1, period=30.0, ttl=10.0, duration=15.0,
        sybil_share=0.3, junk_sybils=1.0, mass_leave_at=0.0, churn_per_minute=0.0, seed=2,
        processes=2,
    )  # fmt: skip
    with trio.fail_after(120):
        report = await run_simulation(config)
    summary = report.summary()
    assert report.junk_replies > 0 and report.forged_sent > 0  # the sybils lied
    assert report.lookup_seconds, "no lookup finished"
    assert summary["recall"] > 0.3  # records found (1.0 on an idle machine)
    assert report.forged_accepted == 0
    assert report.succeeded > 0
    # half of the nodes (and of the sybils) lived in the worker, and took part
    assert len(report.slices) == 2 and report.slices[1].datagrams > 0
    assert report.slices[1].junk_replies > 0
    # each process sampled how late its DHT loop ran (`LoopLag`): the figure beside latency
    assert all(s.loop_lag_p99_ms != 0.0 for s in report.slices), report.slices
    # servers, the client and the probes announced and read through nodes of both processes
    # (`swarm.testing.internet_ops`): the worker's nodes' records went through the strict
    # decoder here, and none forged got through (above)
    operations = summary["dht_operations_per_process"]
    assert isinstance(operations, list) and len(operations) == 2, operations
    assert operations[0] > 0 and operations[1] > 0, operations
