"""Forged records cannot make the client a dialer: pings are rationed per host and back off
for records that did not answer; only records that answered count as proven."""

from __future__ import annotations

from swarm.client.discovery import PingSchedule
from swarm.directory import ServerView
from swarm.identity import Identity
from swarm.types import LayerRange, PeerId


def view(i: int, host: str) -> ServerView:
    peer = PeerId.from_public_key(Identity.from_seed(b"p%d" % i).public_key)
    return ServerView(peer, f"{host}:{7000 + i}", LayerRange(0, 2), 10.0, 1000)


def test_many_forged_records_naming_one_victim_get_few_dials() -> None:
    schedule = PingSchedule(interval_s=30.0, new_per_host=2)
    forged = [view(i, "10.0.0.9") for i in range(21)]  # 21 identities, one victim host
    honest = view(99, "10.0.0.1")
    dials = 0
    now = 0.0
    while now < 60.0:  # a refresh every 5 s for a minute
        due = schedule.due([*forged, honest], now, limit=32)
        dials += sum(1 for s in due if s is not honest)
        for server in due:
            if server is honest:
                schedule.answered(server, now)
            else:
                schedule.failed(server, now)
        now += 5.0
    assert dials <= 2 * 12  # at most 2 per refresh (the issue measured 334 in 45 s)
    assert schedule.reached(honest) and not any(schedule.reached(s) for s in forged)


def test_records_at_many_hosts_back_off_after_failing() -> None:
    schedule = PingSchedule(interval_s=30.0, new_per_host=2)
    forged = [view(i, f"10.0.{i}.9") for i in range(40)]
    attempts = {s.peer_id: 0 for s in forged}
    now = 0.0
    while now < 600.0:
        for server in schedule.due(forged, now, limit=32):
            attempts[server.peer_id] += 1
            schedule.failed(server, now)
        now += 5.0
    # each record: dialed at 0, 30, 90, 210, 450 s at most (doubling backoff)
    assert max(attempts.values()) <= 5
    schedule.forget_except(forged[:1])
    assert len(schedule._next) <= 1  # what is no longer announced is forgotten


def test_a_reached_server_is_pinged_every_interval_and_loses_proof_when_it_fails() -> None:
    schedule = PingSchedule(interval_s=30.0, new_per_host=2)
    honest = view(1, "10.0.0.1")
    assert schedule.due([honest], 0.0, 8) == [honest]
    schedule.answered(honest, 0.0)
    assert schedule.due([honest], 10.0, 8) == [] and schedule.due([honest], 30.0, 8) == [honest]
    schedule.failed(honest, 30.0)
    assert not schedule.reached(honest)
