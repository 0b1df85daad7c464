"""`Chain` against fake in-process servers: outputs, push on/off, recovery."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import torch
import trio
import trio.testing

from swarm.client.chain import Chain
from swarm.client.config import ClientConfig, FailureConfig, HedgeConfig, PipelineConfig
from swarm.client.routing import ServerView
from swarm.errors import RoutingError, SessionError
from swarm.net.pool import open_connection_pool
from swarm.shards import Span
from swarm.types import LayerRange, PeerId

from .fake_server import run_servers
from .pipeline import (
    HIDDEN,
    assert_same,
    make_checkpoint,
    make_full_span,
    make_inputs,
    make_servers,
    open_session,
    reference_outputs,
    run_all,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def full_span(checkpoint: Path) -> Span:
    return make_full_span(checkpoint)


@pytest.mark.parametrize("use_push", [True, False])
async def test_three_hops_match_one_process(
    checkpoint: Path, full_span: Span, use_push: bool
) -> None:
    steps = make_inputs()
    servers = make_servers(checkpoint, [(0, 2), (2, 4), (4, 6)])
    config = ClientConfig(pipeline=PipelineConfig(use_push=use_push, push_grace=5.0))
    async with run_servers(servers), open_session(servers, config) as session:
        assert [h.layers for h in session.route] == [
            LayerRange(0, 2),
            LayerRange(2, 4),
            LayerRange(4, 6),
        ]
        got = await run_all(session, steps)
    assert_same(got, reference_outputs(full_span, steps))
    if use_push:  # hops 2 and 3 got every input by push, none from the client
        assert [s.steps_from_client for s in servers] == [5, 0, 0]
        assert [s.steps_from_push for s in servers] == [0, 5, 5]
    else:
        assert [s.steps_from_client for s in servers] == [5, 5, 5]
        assert [s.steps_from_push for s in servers] == [0, 0, 0]


@pytest.mark.parametrize("mode", ["die", "hang"])
@pytest.mark.parametrize("use_push", [True, False])
async def test_failed_hop_is_replaced_with_the_same_outputs(
    checkpoint: Path,
    full_span: Span,
    mode: str,
    use_push: bool,
    autojump_clock: trio.testing.MockClock,  # the step timeout passes on a virtual clock
) -> None:
    steps = make_inputs(1)
    # the middle hop [2,4) is preferred (fast); a slow replica [2,6) exists
    servers = make_servers(checkpoint, [(0, 2), (2, 4), (4, 6), (2, 6)])
    if mode == "die":
        servers[1].die_at_step = 3
    else:
        servers[1].hang_at_step = 3
    # no hedging: a hop that hangs is recovered from at its step timeout (test_hedging.py
    # shows the hedge that comes first by default)
    config = ClientConfig(
        step_timeout=1.0,
        pipeline=PipelineConfig(use_push=use_push, push_grace=0.3),
        hedging=HedgeConfig(after=None),
    )
    async with (
        run_servers(servers),
        open_session(servers, config, [100.0, 100.0, 100.0, 1.0]) as session,
    ):
        assert servers[1].identity.peer_id in {h.server.peer_id for h in session.route}
        got = await run_all(session, steps)
        route = session.route
        stats = session.statistics()
    assert_same(got, reference_outputs(full_span, steps))
    assert stats.recoveries == 1
    assert servers[1].identity.peer_id not in {h.server.peer_id for h in route}
    assert servers[3].identity.peer_id in {h.server.peer_id for h in route}
    assert session.bans.is_banned(servers[1].identity.peer_id)


async def test_refused_open_goes_elsewhere(checkpoint: Path, full_span: Span) -> None:
    steps = make_inputs(2)
    servers = make_servers(checkpoint, [(0, 6), (0, 6)])
    servers[0].refuse_open = True
    async with (
        run_servers(servers),
        open_session(servers, ClientConfig(), [1000.0, 1.0]) as session,
    ):
        assert [h.server.peer_id for h in session.route] == [servers[1].identity.peer_id]
        got = await run_all(session, steps)
        full = servers[0].identity.peer_id
        # a full server did nothing wrong: it is avoided and penalised, not banned
        assert not session.bans.is_banned(full)
        assert session.bans.penalties.penalty(full) > 0
    assert_same(got, reference_outputs(full_span, steps))


async def test_no_replacement_is_a_clear_error(
    checkpoint: Path, autojump_clock: trio.testing.MockClock
) -> None:
    servers = make_servers(checkpoint, [(0, 3), (3, 6)])
    servers[1].die_at_step = 1
    config = ClientConfig(
        step_timeout=1.0,
        pipeline=PipelineConfig(push_grace=0.3),
        failures=FailureConfig(route_wait_s=10.0),
    )
    async with run_servers(servers), open_session(servers, config) as session:
        started = trio.current_time()
        with pytest.raises(RoutingError, match="banned"):
            await run_all(session, make_inputs())
        assert trio.current_time() - started >= 10.0  # it looked for a route that long


class _ChangingDirectory:
    """A directory whose list of servers the test changes while a chain runs."""

    def __init__(self, servers: Sequence[ServerView]) -> None:
        self.listed = list(servers)
        self.looks = 0
        self.pings: Mapping[PeerId, float] = {}

    async def servers(self, *, refresh: bool = False) -> Sequence[ServerView]:
        self.looks += 1
        return list(self.listed)

    def absence_hint(self) -> str:
        return ""

    def reached(self, server: ServerView) -> bool:
        return True

    def unreachable(self, server: ServerView) -> bool:
        return False


async def test_recovery_waits_for_the_gap_to_be_covered(
    checkpoint: Path, full_span: Span, autojump_clock: trio.testing.MockClock
) -> None:
    """The only server of [3,6) dies mid-generation; 5 s later another one covers [3,6)
    (as rebalancing would): the recovery waits for it and the outputs are the reference's,
    where it used to give up at once with `RoutingError`. (5 s: within the fake servers'
    10 s limit on a session without input; real servers close idle sessions after 120 s,
    past the default wait.)"""
    steps = make_inputs(3)
    servers = make_servers(checkpoint, [(0, 3), (3, 6), (3, 6)])
    servers[1].die_at_step = 2
    directory = _ChangingDirectory([])
    config = ClientConfig(step_timeout=1.0, pipeline=PipelineConfig(push_grace=0.3))
    assert config.failures.route_wait_s >= 30.0  # the default waits

    async def cover_the_gap_later() -> None:
        await servers[1].died.wait()
        await trio.sleep(5.0)
        directory.listed = [servers[0].view(), servers[2].view()]

    async with (
        run_servers(servers),
        open_connection_pool(config.identity) as pool,
        trio.open_nursery() as nursery,
    ):
        directory.listed = [servers[0].view(), servers[1].view()]  # (bound ports now)
        nursery.start_soon(cover_the_gap_later)
        async with Chain.open(
            pool, directory, config, layers=LayerRange(0, 6), max_length=32, rng=random.Random(0)
        ) as chain:
            with trio.fail_after(120):
                got = [(await chain.step(h, p)).output for h, p in steps]
            route, stats = chain.route, chain.statistics()
    assert_same(got, reference_outputs(full_span, steps))
    assert stats.recoveries == 1
    assert [h.server.peer_id for h in route] == [
        s.identity.peer_id for s in (servers[0], servers[2])
    ]
    assert directory.looks > 3  # it looked again while it waited


async def test_wrong_input_is_not_retried(checkpoint: Path) -> None:
    servers = make_servers(checkpoint, [(0, 6), (0, 6)])
    async with run_servers(servers), open_session(servers, ClientConfig()) as session:
        with pytest.raises(SessionError, match="wrong hidden size"):
            await session.step(torch.zeros(1, 2, HIDDEN + 1), torch.arange(2).unsqueeze(0))
        assert session.recoveries == 0


async def test_too_many_recoveries(
    checkpoint: Path, autojump_clock: trio.testing.MockClock
) -> None:
    servers = make_servers(checkpoint, [(0, 6), (0, 6)])
    for s in servers:
        s.hang_at_step = 1
    config = ClientConfig(step_timeout=0.5, failures=FailureConfig(max_recoveries=1))
    async with run_servers(servers), open_session(servers, config) as session:
        with pytest.raises((SessionError, RoutingError)):
            await run_all(session, make_inputs())
