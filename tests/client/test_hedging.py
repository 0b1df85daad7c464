"""Hedged steps against fake in-process servers: a hop that stops answering mid-generation
is raced by a replacement (same outputs, penalised not banned); a late hop that answers
while the replacement is still replaying wins; with no replica the step timeout still rules.
Plus the adaptive deadline and the routing penalty on their own.

The hedge deadlines and step timeouts run on trio's virtual clock (`autojump_clock`): the
fake servers compute in the event loop and talk over loopback sockets in this process, so
no thread or other process runs while the clock jumps, and no real second passes."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import trio
import trio.testing

from swarm.client.bans import BanList, Penalties
from swarm.client.chain import Chain, HedgeWinner, hedge_deadline, usual_seconds
from swarm.client.chain.hedging import alternative_counts
from swarm.client.chain.hop import HopHistory, HopState, StepAnswer, StepCall
from swarm.client.config import ClientConfig, FailureConfig, HedgeConfig, PipelineConfig
from swarm.errors import ConfigError, RoutingError
from swarm.identity import Identity
from swarm.shards import Span
from swarm.types import PeerId

from .fake_server import FakeServer, run_servers
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

HEDGED_STEP = 3  # make_inputs: a 5-token prefill (step 0), then single tokens (steps 1-4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def full_span(checkpoint: Path) -> Span:
    return make_full_span(checkpoint)


def _chain(checkpoint: Path) -> list[FakeServer]:
    """[0,2) [2,4) [4,6) and a replica of the middle hop, [2,4), that routes avoid."""
    return make_servers(checkpoint, [(0, 2), (2, 4), (4, 6), (2, 4)])


THROUGHPUTS = [100.0, 100.0, 100.0, 1.0]


def _history(session: Chain, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return session.hop(k).history.view().tensors()


def _assert_histories_chain(session: Chain, tokens: int) -> None:
    """Every hop's history covers all ``tokens`` and starts from its predecessor's outputs."""
    for k in range(len(session.route)):
        x, pos, out = _history(session, k)
        assert x.shape[1] == pos.shape[1] == out.shape[1] == tokens
        assert torch.equal(pos[0], torch.arange(tokens))
        if k > 0:
            torch.testing.assert_close(x, _history(session, k - 1)[2])


@pytest.mark.parametrize("use_push", [True, False])
async def test_a_hop_that_stops_is_raced_and_replaced(
    checkpoint: Path, full_span: Span, use_push: bool, autojump_clock: trio.testing.MockClock
) -> None:
    steps = make_inputs(1)
    servers = _chain(checkpoint)
    slow, replica = servers[1], servers[3]
    slow.hang_at_step = HEDGED_STEP
    config = ClientConfig(
        pipeline=PipelineConfig(use_push=use_push)
    )  # the default 30 s step timeout, hedging on
    async with run_servers(servers), open_session(servers, config, THROUGHPUTS) as session:
        assert session.route[1].server.peer_id == slow.identity.peer_id
        got = await run_all(session, steps)
        stats = session.statistics()
        route = [hop.server.peer_id for hop in session.route]
        _assert_histories_chain(session, sum(x.shape[1] for x, _ in steps))
        assert len(session.hop(1).history) == 3  # the replay, the hedged step, the next one
    assert_same(got, reference_outputs(full_span, steps))
    (hedge,) = stats.hedges
    assert hedge.step == HEDGED_STEP and hedge.slow == slow.identity.peer_id
    assert hedge.winner is HedgeWinner.REPLACEMENT
    assert config.hedging.floor <= hedge.deadline < config.step_timeout  # adaptive, not 30 s
    assert hedge.seconds is not None
    assert hedge.deadline <= hedge.seconds < config.step_timeout / 4  # no step-timeout wait
    assert route == [
        servers[0].identity.peer_id,
        replica.identity.peer_id,
        servers[2].identity.peer_id,
    ]
    # penalised, not banned, not counted as a failure
    assert stats.recoveries == 0 and stats.failures == ()
    assert not session.bans.is_banned(slow.identity.peer_id)
    assert session.bans.penalties.penalty(slow.identity.peer_id) > 0
    if use_push:  # the replica got the replay and the hedged step from the client, the last
        # step by push from hop 0; hop 2 got every step by push but the hedged one
        assert (replica.steps_from_client, replica.steps_from_push) == (2, 1)
        assert servers[2].steps_from_push >= len(steps) - 1


async def test_a_late_hop_that_answers_mid_replay_wins(
    checkpoint: Path, full_span: Span, autojump_clock: trio.testing.MockClock
) -> None:
    steps = make_inputs(2)
    servers = _chain(checkpoint)
    slow, replica = servers[1], servers[3]
    slow.hold_at_step = HEDGED_STEP
    replica.hold_at_step = HEDGED_STEP - 1  # the replay: held until the session is closed

    async def answer_once_the_replay_runs() -> None:
        await replica.holding.wait()
        slow.release.set()

    async with (
        run_servers(servers),
        open_session(servers, ClientConfig(), THROUGHPUTS) as session,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(answer_once_the_replay_runs)
        got = await run_all(session, steps)
        stats = session.statistics()
        _assert_histories_chain(session, sum(x.shape[1] for x, _ in steps))
        with trio.fail_after(5):  # the replacement's sub-session was closed, not left behind
            while replica.sessions:
                await trio.sleep(0.01)
        route = [hop.server.peer_id for hop in session.route]
    assert_same(got, reference_outputs(full_span, steps))
    (hedge,) = stats.hedges
    assert hedge.winner is HedgeWinner.ORIGINAL
    assert replica.opened == 1 and replica.steps_from_client == 1  # it got as far as the replay
    assert route == [s.identity.peer_id for s in servers[:3]]
    assert not session.bans.is_banned(slow.identity.peer_id)
    # it won, but late enough to cost a hedge: routes through it cost a little more
    assert session.bans.penalties.penalty(slow.identity.peer_id) > 0


@pytest.mark.parametrize("slowdown", [1.0, 1.6])
async def test_a_steadily_slow_hop_is_raced_by_what_the_swarm_can_do(
    checkpoint: Path, full_span: Span, autojump_clock: trio.testing.MockClock, slowdown: float
) -> None:
    """Issue 25 item 5: a server 5 s a step from its first step (or slowing 1.6x a step) was
    never raced, its own history being its only yardstick, once 3x that passed the step
    timeout. An idle replica announcing 50 tokens/s makes 0.5 s the deadline: the slow hop is
    raced at its first decode step, loses, is penalised and replaced; the outputs are the same."""
    steps = make_inputs(3)
    servers = _chain(checkpoint)
    slow, replica = servers[1], servers[3]
    slow.step_delay = 5.0
    config = ClientConfig(step_timeout=12.0)
    async with run_servers(servers), open_session(servers, config, [100, 100, 100, 50]) as s:
        assert s.route[1].server.peer_id == slow.identity.peer_id
        got = []
        for x, pos in steps:
            got.append((await s.step(x, pos)).output)
            slow.step_delay *= slowdown
        stats = s.statistics()
        route = [hop.server.peer_id for hop in s.route]
    assert_same(got, reference_outputs(full_span, steps))
    assert stats.hedges and stats.hedges[0].winner is HedgeWinner.REPLACEMENT
    assert stats.hedges[0].deadline <= 1.0  # the swarm's yardstick, not 3 x 5 s
    assert route[1] == replica.identity.peer_id
    assert s.bans.penalties.penalty(slow.identity.peer_id) > 0


async def test_an_unproven_record_is_no_yardstick(
    checkpoint: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A record the client has not proven (no answer to its ping as that peer at that
    address) may claim any throughput: it does not set the hedge deadline, which then comes
    from the hop's own history (its 5-token prompt: 1 s a token, so 3 s), not 0.5 s."""
    import random

    from swarm.client.discovery import StaticDirectory
    from swarm.directory import ServerView
    from swarm.net.pool import open_connection_pool
    from swarm.types import LayerRange

    servers = _chain(checkpoint)
    slow, replica = servers[1], servers[3]
    slow.step_delay = 5.0

    class ReplicaUnproven(StaticDirectory):
        def reached(self, server: ServerView) -> bool:
            return server.peer_id != replica.identity.peer_id

    config = ClientConfig(step_timeout=12.0)
    async with run_servers(servers), open_connection_pool(config.identity) as pool:
        views = [s.view(t) for s, t in zip(servers, [100, 100, 100, 50], strict=True)]
        directory = ReplicaUnproven(views)
        async with Chain.open(
            pool, directory, config, layers=LayerRange(0, 6), max_length=32, rng=random.Random(0)
        ) as chain:
            assert chain.route[1].server.peer_id == slow.identity.peer_id
            for x, pos in make_inputs(3)[:2]:
                await chain.step(x, pos)
            stats = chain.statistics()
    (hedge,) = stats.hedges  # raced by its own history, as before the swarm's yardstick
    assert hedge.deadline == pytest.approx(3.0, abs=0.1)  # not the replica's claimed 0.5 s


async def test_without_a_replica_the_step_timeout_still_rules(
    checkpoint: Path, autojump_clock: trio.testing.MockClock
) -> None:
    servers = make_servers(checkpoint, [(0, 3), (3, 6)])
    servers[1].hang_at_step = HEDGED_STEP
    config = ClientConfig(  # on the virtual clock; the recovery looks for a route for 3 s,
        step_timeout=1.0,  # less than the hanging server's 5 s ban (then it would retry it)
        pipeline=PipelineConfig(push_grace=0.3),
        failures=FailureConfig(route_wait_s=3.0),
    )
    async with run_servers(servers), open_session(servers, config) as session:
        with pytest.raises(RoutingError, match="banned"):
            await run_all(session, make_inputs())
        stats = session.statistics()
    (hedge,) = stats.hedges  # tried, found no other server for [3,6), waited for the hop
    assert hedge.winner is HedgeWinner.NONE and hedge.seconds is None
    assert stats.recoveries == 1  # then the failure path: banned, no one left
    assert session.bans.is_banned(servers[1].identity.peer_id)


def test_usual_seconds_scales_multi_token_steps() -> None:
    assert usual_seconds([], 1) is None
    decode = [(1, 0.010)] * 9 + [(1, 0.030)]  # one outlier among ten
    assert usual_seconds(decode, 1) == pytest.approx(0.010)  # the 90th percentile
    # a prefill of 100 tokens without a multi-token sample: 100 decode steps (errs late)
    assert usual_seconds(decode, 100) == pytest.approx(1.0)
    # with a 50-token prefill of 0.05 s: 1 ms a token, never below one decode step
    history = [(50, 0.05), *decode]
    assert usual_seconds(history, 100) == pytest.approx(0.1)
    assert usual_seconds(history, 2) == pytest.approx(0.010)
    assert usual_seconds([(50, 0.05)], 1) == pytest.approx(0.001)  # only a prefill so far
    old = [(1, 5.0)] * 20
    assert usual_seconds(old + [(1, 0.010)] * 16, 1) == pytest.approx(0.010)  # a window of 16


def _timed_history(seconds: float, steps: int = 4) -> HopState:
    history = HopHistory()
    for _ in range(steps):
        x = torch.zeros(1, 1, 8)
        history.record(x, torch.zeros(1, 1, dtype=torch.long), StepAnswer(x, None, seconds))
    return SimpleNamespace(history=history)  # type: ignore[return-value]  # all they read


@pytest.mark.parametrize("usual", [0.001, 0.1, 0.2, 0.4, 2.0])
@pytest.mark.parametrize("alternative", [None, 0.0001, 0.01, 0.1, 5.0])
def test_the_alternative_is_read_only_where_it_can_move_the_deadline(
    usual: float, alternative: float | None
) -> None:
    """A step asks the directory for the best other server only where its answer can change
    the hedge deadline; elsewhere the deadline is the one it would have given."""
    config = ClientConfig(hedging=HedgeConfig(after=3.0, floor=0.5))
    state = _timed_history(usual)
    with_it = hedge_deadline(state, 1, config, alternative)
    if not alternative_counts(state, 1, config):
        assert with_it == hedge_deadline(state, 1, config, None) == 0.5  # the floor
    else:
        assert usual * 3.0 > 0.5
    assert not alternative_counts(_timed_history(usual, steps=0), 1, config)  # no history
    off = ClientConfig(hedging=HedgeConfig(after=None))
    assert not alternative_counts(state, 1, off)


def test_hedge_config_is_checked() -> None:
    with pytest.raises(ConfigError):
        ClientConfig(hedging=HedgeConfig(after=0.5))
    with pytest.raises(ConfigError):
        ClientConfig(hedging=HedgeConfig(floor=0))
    with pytest.raises(ConfigError):
        ClientConfig(hedging=HedgeConfig(slow_penalty=-1))


def test_penalties_decay_and_add_up() -> None:
    now = [0.0]
    penalties = Penalties(clock=lambda: now[0])
    peer = Identity.from_seed(b"penalised").peer_id
    assert penalties.penalty(peer) == 0 and penalties.current() == {}
    assert penalties.penalise(peer, 1.0, half_life_s=10.0) == 1.0
    now[0] = 10.0
    assert penalties.penalty(peer) == pytest.approx(0.5)
    assert penalties.penalise(peer, 1.0, half_life_s=10.0) == pytest.approx(1.5)
    now[0] = 1000.0
    assert penalties.current() == {}  # forgotten
    bans = BanList(5, 2, 300, clock=lambda: now[0])
    assert bans.penalties.penalty(peer) == 0 and not bans.is_banned(peer)


def _long_inputs(singles: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A 5-token prefill, then ``singles`` single-token steps."""
    gen = torch.Generator().manual_seed(7)
    steps, pos = [], 0
    for n in (5, *[1] * singles):
        steps.append((torch.randn(1, n, HIDDEN, generator=gen), torch.arange(pos, pos + n)[None]))
        pos += n
    return steps


async def test_a_hop_raced_and_late_twice_is_moved_before_its_next_step(
    checkpoint: Path, full_span: Span, autojump_clock: trio.testing.MockClock
) -> None:
    """Issue 25 item 5: a server slow on some steps only, whose replica replays slower than
    it ends its late step, won every race and kept its place (18 wasted replays in 300
    tokens). After two such races it is moved before its next step: the replica opens,
    replays the history and takes the hop; the outputs are the same."""
    steps = _long_inputs(16)
    servers = _chain(checkpoint)
    slow, replica = servers[1], servers[3]
    replica.step_delay = 2.0  # a race's replay ends after the late original's answer
    late_steps = {2, 14}  # far enough apart that the hop's usual time is its fast one again
    got: list[torch.Tensor] = []
    route_at: dict[int, PeerId] = {}
    async with run_servers(servers), open_session(servers, ClientConfig(), THROUGHPUTS) as s:
        for step, (x, pos) in enumerate(steps):
            slow.step_delay = 0.8 if step in late_steps else 0.0
            if step == max(late_steps) + 1:
                replica.step_delay = 0.0
            got.append((await s.step(x, pos)).output)
            route_at[step] = s.route[1].server.peer_id
        stats = s.statistics()
    assert_same(got, reference_outputs(full_span, steps))
    assert [(h.step, h.winner) for h in stats.hedges] == [
        (step, HedgeWinner.ORIGINAL) for step in sorted(late_steps)
    ]
    moved_at = max(late_steps) + 1
    assert all(route_at[i] == slow.identity.peer_id for i in range(moved_at))
    assert all(route_at[i] == replica.identity.peer_id for i in range(moved_at, len(steps)))


async def test_a_hop_raced_and_late_once_keeps_its_place(
    checkpoint: Path, full_span: Span, autojump_clock: trio.testing.MockClock
) -> None:
    """One late step in the window is a hiccup, not a pattern: the hop stays."""
    steps = _long_inputs(5)
    servers = _chain(checkpoint)
    slow, replica = servers[1], servers[3]
    replica.step_delay = 2.0
    async with run_servers(servers), open_session(servers, ClientConfig(), THROUGHPUTS) as s:
        got = []
        for step, (x, pos) in enumerate(steps):
            slow.step_delay = 0.8 if step == 2 else 0.0
            got.append((await s.step(x, pos)).output)
        stats = s.statistics()
        assert s.route[1].server.peer_id == slow.identity.peer_id
    assert_same(got, reference_outputs(full_span, steps))
    assert [h.winner for h in stats.hedges] == [HedgeWinner.ORIGINAL]


@pytest.mark.parametrize("send_now", [True, False])
async def test_a_step_late_within_its_deadline_is_waited_for_on_without_resending(
    checkpoint: Path, send_now: bool, autojump_clock: trio.testing.MockClock
) -> None:
    """A hedged step first waits for its hop within the deadline (`StepCall.answer` with
    ``within``): a late hop gives None there, its input sent by then (after the push's
    grace where a push was awaited), and waiting on gets its answer, sent once."""
    servers = make_servers(checkpoint, [(0, 6)])
    config = ClientConfig(pipeline=PipelineConfig(push_grace=0.2))
    (x, positions), *_ = make_inputs()
    async with run_servers(servers), open_session(servers, config) as session:
        state, server = session.hop(0), servers[0]
        server.step_delay = 5.0
        call = StepCall(state, config, 0, x, positions)
        assert await call.answer(send_now, grace=0.2, within=1.0) is None
        assert call.sent and trio.current_time() - call.started == pytest.approx(1.0)
        answer = await call.answer(send_now, grace=0.2)
        assert answer is not None and answer.out.shape == x.shape
        assert answer.seconds == pytest.approx(5.0, abs=0.5)  # counted from the call's start
        assert server.steps_from_client == 1
