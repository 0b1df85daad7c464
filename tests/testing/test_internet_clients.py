"""The simulated client's opening of a route (`swarm.testing.internet_clients`): a server
gone since its record was read fails to open and is routed around, as the product's
`HopOpener.open` does, without costing the generation one of its recoveries."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import trio

from swarm.client.bans import BanList
from swarm.client.config import FailureConfig, PingConfig
from swarm.directory import ServerView
from swarm.testing.internet_clients import SimClient
from swarm.testing.internet_model import Failure, SimConfig, SimReport, SimServer
from swarm.testing.internet_plane import REGIONS
from swarm.types import LayerRange, PeerId

WHOLE = LayerRange(0, 2)


def server(throughput: float, *, alive: bool = True) -> SimServer:
    node: Any = SimpleNamespace(peer_id=PeerId(os.urandom(32)))
    return SimServer(node, REGIONS[0], throughput, WHOLE, delivered=throughput, alive=alive)


@dataclass
class FakeSim:
    """What `SimClient` reads of a `Simulation`: its servers (the truth), their records as a
    read returns them (dead servers' records included: they outlive them), the links."""

    servers: list[SimServer]
    failure_config: FailureConfig = field(default_factory=FailureConfig)
    cfg: SimConfig = field(default_factory=lambda: SimConfig(blocks=2, tokens=3))
    report: SimReport = field(init=False)
    delay: dict[tuple[str, str], float] = field(init=False)

    def __post_init__(self) -> None:
        self.report = SimReport(self.cfg)
        self.delay = {(a, b): 0.01 for a in REGIONS for b in REGIONS}

    def honest_node(self) -> None:
        return None

    async def read(self, node: None) -> list[ServerView]:
        return [s.view() for s in self.servers]

    def truth(self) -> list[SimServer]:
        return [s for s in self.servers if s.alive]

    def uncovered_blocks(self) -> int:
        return 0 if self.truth() else 2


async def test_a_dead_servers_record_fails_to_open_and_costs_no_recovery(
    autojump_clock: trio.abc.Clock,
) -> None:
    dead, live = server(100.0, alive=False), server(10.0)  # the dead one looks faster
    sim = FakeSim([dead, live])
    client = SimClient(sim, 0)  # type: ignore[arg-type]
    bans = BanList(5.0, 2.0, 300.0)
    route = [dead.view()]
    assert await client.generate(route, REGIONS[0], bans) is None
    assert sim.report.open_failures == 1
    assert sim.report.recoveries == 0
    assert dead.peer_id in bans.banned()
    assert len(sim.report.token_seconds) == sim.cfg.tokens


async def test_more_dead_servers_than_open_retries_fail_the_generation(
    autojump_clock: trio.abc.Clock,
) -> None:
    retries = 2
    dead = [server(100.0 + i, alive=False) for i in range(retries + 2)]
    sim = FakeSim([*dead, server(1.0)], FailureConfig(max_open_retries=retries))
    client = SimClient(sim, 0)  # type: ignore[arg-type]
    bans = BanList(5.0, 2.0, 300.0)
    cause = await client.generate([dead[-1].view()], REGIONS[0], bans)
    assert cause is Failure.OPEN_GAVE_UP
    assert sim.report.open_failures == retries + 1
    assert sim.report.recoveries == 0


async def test_every_dead_hop_of_a_route_is_banned_after_one_attempt(
    autojump_clock: trio.abc.Clock,
) -> None:
    # both hops of the planned route died together: one failed attempt bans both, and the
    # next opens (one re-plan per dead hop would exceed the one retry allowed)
    def half(i: int, throughput: float, alive: bool) -> SimServer:
        node: Any = SimpleNamespace(peer_id=PeerId(os.urandom(32)))
        layers = LayerRange(i, i + 1)
        return SimServer(node, REGIONS[0], throughput, layers, delivered=throughput, alive=alive)

    dead = [half(0, 100.0, False), half(1, 100.0, False)]
    sim = FakeSim(
        [*dead, half(0, 10.0, True), half(1, 10.0, True)], FailureConfig(max_open_retries=1)
    )
    client = SimClient(sim, 0)  # type: ignore[arg-type]
    bans = BanList(5.0, 2.0, 300.0)
    assert await client.generate([d.view() for d in dead], REGIONS[0], bans) is None
    assert sim.report.open_failures == 2
    assert bans.banned() == {d.peer_id for d in dead}
    assert len(sim.report.token_seconds) == sim.cfg.tokens


async def test_a_server_dead_for_a_ping_interval_ranks_far_lower_as_unreachable(
    autojump_clock: trio.abc.Clock,
) -> None:
    dead, live = server(11.0, alive=False), server(10.0)  # the dead one a little faster
    sim = FakeSim([dead, live])
    client = SimClient(sim, 0)  # type: ignore[arg-type]
    views = [dead.view(), live.view()]
    dead.died_at = trio.current_time()
    _, route = client.plan(views, REGIONS[0])
    assert route == [views[0]]  # no ping has failed yet: its record still looks proven
    await trio.sleep(PingConfig().interval_s + PingConfig().timeout)
    _, route = client.plan(views, REGIONS[0])
    assert route == [views[1]]
