"""`Chain` against fake in-process servers: outputs, push on/off, recovery."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import trio
import trio.testing

from swarm.client.config import ClientConfig, FailureConfig, HedgeConfig, PipelineConfig
from swarm.errors import RoutingError, SessionError
from swarm.shards import Span
from swarm.types import LayerRange

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
    config = ClientConfig(step_timeout=1.0, pipeline=PipelineConfig(push_grace=0.3))
    async with run_servers(servers), open_session(servers, config) as session:
        with pytest.raises(RoutingError, match="banned"):
            await run_all(session, make_inputs())


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
