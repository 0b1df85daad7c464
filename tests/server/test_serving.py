"""Servers in one process, driven over raw RPC: steps, push between servers, limits, errors."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
import trio

from swarm.directory import block_keys, delivered_by_peers, servers_from_records
from swarm.errors import ErrorCode, LimitExceeded, RemoteError
from swarm.identity import Identity
from swarm.net.messages import (
    ForwardRequest,
    ForwardResponse,
    InferenceInput,
    InferenceOpen,
    InferenceReady,
    InferenceStepResult,
    InfoRequest,
    InfoResponse,
    PushTarget,
)
from swarm.net.pool import ConnectionPool, open_connection_pool
from swarm.server.sessions import SessionLimits
from swarm.shards import load_span
from swarm.testing.checkpoints import write_random_llama
from swarm.testing.swarm import LocalSwarm, open_local_swarm
from swarm.types import LayerRange

HIDDEN = 64


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("serving") / "tiny"
    write_random_llama(path, num_layers=6, hidden=HIDDEN, seed=3, std=0.1)
    return path


@pytest.fixture
async def swarm2(model_path: Path) -> AsyncIterator[LocalSwarm]:
    async with open_local_swarm(model_path, [LayerRange(0, 3), LayerRange(3, 6)]) as local:
        yield local


@pytest.fixture
async def pool() -> AsyncIterator[ConnectionPool]:
    async with open_connection_pool(Identity.generate()) as p:
        yield p


def reference(model_path: Path, hidden: torch.Tensor) -> torch.Tensor:
    span = load_span(model_path, LayerRange(0, 6))
    positions = torch.arange(hidden.shape[1]).view(1, -1)
    with torch.no_grad():
        return span(hidden, positions)


async def test_info_and_forward(swarm2: LocalSwarm, pool: ConnectionPool, model_path: Path) -> None:
    s0, s1 = swarm2.servers
    info = await pool.call(
        s0.ready.host,
        s0.ready.port,
        "info",
        InfoRequest(),
        InfoResponse,
        expected_peer=s0.ready.peer_id,
    )
    assert info.layer_range == LayerRange(0, 3) and info.state == "online"
    assert info.throughput > 0 and info.model_id == s0.ready.model_id
    hidden = torch.randn(1, 5, HIDDEN)
    positions = torch.arange(5).view(1, 5)
    out = hidden
    for s, layers in ((s0, LayerRange(0, 3)), (s1, LayerRange(3, 6))):
        reply = await pool.call(
            s.ready.host,
            s.ready.port,
            "forward",
            ForwardRequest(out, positions, layers),
            ForwardResponse,
        )
        out = reply.hidden_states
    torch.testing.assert_close(out, reference(model_path, hidden))


async def test_inference_with_push_matches_one_pass(
    swarm2: LocalSwarm, pool: ConnectionPool, model_path: Path
) -> None:
    """Pushes carry hop 0's outputs to hop 1; after the first (which dials the channel
    between the servers), each leaves from the step's own task, not one spawned for it."""

    class PushTasks(trio.abc.Instrument):
        spawned = 0

        def task_spawned(self, task: trio.lowlevel.Task) -> None:
            self.spawned += task.name.endswith("._push")

    spy = PushTasks()
    trio.lowlevel.add_instrument(spy)
    s0, s1 = swarm2.servers
    tokens = torch.randn(1, 9, HIDDEN)
    sid0, sid1 = os.urandom(16), os.urandom(16)
    c0 = await pool.get(s0.ready.host, s0.ready.port, s0.ready.peer_id)
    c1 = await pool.get(s1.ready.host, s1.ready.port, s1.ready.peer_id)
    target = PushTarget(s1.ready.peer_id, s1.ready.host, s1.ready.port, sid1)
    outputs = []
    with trio.fail_after(30):
        async with c0.open_stream("inference") as h0, c1.open_stream("inference") as h1:
            await h0.send(InferenceOpen(sid0, 16, 1, "float32", LayerRange(0, 3), push_to=target))
            await h1.send(
                InferenceOpen(sid1, 16, 1, "float32", LayerRange(3, 6), push_from=s0.ready.peer_id)
            )
            await h0.receive(InferenceReady)
            await h1.receive(InferenceReady)
            chunks = [(0, 5), (5, 6), (6, 7), (7, 8), (8, 9)]  # prefill, then one token a step
            for step, (a, b) in enumerate(chunks):
                positions = torch.arange(a, b).view(1, -1)
                await h0.send(InferenceInput(step, tokens[:, a:b], positions))
                first = await h0.receive(InferenceStepResult)
                second = await h1.receive(InferenceStepResult)  # its input came by push only
                assert first.step == second.step == step
                outputs.append(second.hidden_states)
            await h0.send_end()
            await h1.send_end()
    trio.lowlevel.remove_instrument(spy)
    torch.testing.assert_close(torch.cat(outputs, dim=1), reference(model_path, tokens))
    if sys.platform.startswith("linux"):  # `SecureChannel.can_send_at_once` polls as Linux does
        assert spy.spawned == 1


async def test_a_session_steps_as_inputs_arrive_and_times_out_waiting(
    model_path: Path, pool: ConnectionPool
) -> None:
    """The session's task takes the client's messages as they arrive (no reader task in
    between): each step runs once its input is there, and an input that does not come
    within ``step_timeout`` fails the session with a clear error."""
    async with open_local_swarm(model_path) as local:
        s = await local.add_server(LayerRange(0, 6), step_timeout=0.5)
        conn = await pool.get(s.ready.host, s.ready.port, s.ready.peer_id)
        tokens = torch.randn(1, 4, HIDDEN)
        outputs = []
        with trio.fail_after(20):
            async with conn.open_stream("inference", timeout=10) as h:
                await h.send(InferenceOpen(os.urandom(16), 16, 1, "float32", LayerRange(0, 6)))
                await h.receive(InferenceReady)
                for step, (a, b) in enumerate([(0, 2), (2, 3), (3, 4)]):
                    positions = torch.arange(a, b).view(1, -1)
                    await h.send(InferenceInput(step, tokens[:, a:b], positions))
                    outputs.append((await h.receive(InferenceStepResult)).hidden_states)
                with pytest.raises(RemoteError, match="input of step 3 did not arrive"):
                    await h.receive(InferenceStepResult)
    torch.testing.assert_close(torch.cat(outputs, dim=1), reference(model_path, tokens))


async def test_limits_and_bad_input_are_clear_errors(
    model_path: Path, pool: ConnectionPool
) -> None:
    async with open_local_swarm(model_path) as local:
        limits = SessionLimits(
            max_sessions=2,
            max_length=32,
            cache_tokens=48,
            peer_cache_share=1.0,
            host_cache_share=1.0,
        )
        s = await local.add_server(LayerRange(0, 6), limits=limits)
        conn = await pool.get(s.ready.host, s.ready.port, s.ready.peer_id)

        async def open_session(length: int, layers: LayerRange = LayerRange(0, 6)) -> object:
            stream_cm = conn.open_stream("inference", timeout=10)
            stream = await stream_cm.__aenter__()
            await stream.send(InferenceOpen(os.urandom(16), length, 1, "float32", layers))
            try:
                await stream.receive(InferenceReady)
            except BaseException:
                await stream_cm.__aexit__(None, None, None)
                raise
            return stream_cm, stream

        with pytest.raises(LimitExceeded, match="max_length 64"):
            await open_session(64)
        with pytest.raises(RemoteError, match="not inside"):
            await open_session(8, LayerRange(2, 8))
        cm1, st1 = await open_session(32)  # type: ignore[misc]
        with pytest.raises(LimitExceeded, match="server is full"):
            await open_session(32)
        # wrong hidden size, a step past max_length, an unknown session: errors, server lives on
        await st1.send(InferenceInput(0, torch.randn(1, 2, HIDDEN + 1), torch.zeros(1, 2).long()))
        with pytest.raises(RemoteError, match="hidden states must be"):
            await st1.receive(InferenceStepResult)
        await cm1.__aexit__(None, None, None)
        cm2, st2 = await open_session(4)  # type: ignore[misc]
        await st2.send(InferenceInput(0, torch.randn(1, 5, HIDDEN), torch.arange(5).view(1, 5)))
        with pytest.raises(RemoteError, match="KV cache is full"):
            await st2.receive(InferenceStepResult)
        await cm2.__aexit__(None, None, None)
        info = await conn.call("info", InfoRequest(), InfoResponse)
        assert info.state == "online" and info.active_sessions == 0


async def test_unknown_session_and_wrong_dtype(swarm2: LocalSwarm, pool: ConnectionPool) -> None:
    from swarm.errors import SessionError
    from swarm.net.messages import PushRequest
    from swarm.net.rpc import CallContext
    from swarm.net.surface import notify_push

    s0 = swarm2.servers[0]
    conn = await pool.get(s0.ready.host, s0.ready.port, s0.ready.peer_id)
    push = PushRequest(os.urandom(16), 0, torch.randn(1, 1, HIDDEN), torch.zeros(1, 1).long())
    assert s0.server.handlers is not None
    with pytest.raises(SessionError, match="unknown or expired session"):
        s0.server.handlers.take_push(push, CallContext(pool.identity.peer_id, "push"))
    await notify_push(conn, push)  # one-way: dropped on the server, nothing answers
    with pytest.raises(RemoteError, match="one-way"):
        await conn.call("push", push, InfoResponse)
    ints = ForwardRequest(
        torch.zeros(1, 2, HIDDEN, dtype=torch.int64), torch.arange(2).view(1, 2), LayerRange(0, 3)
    )
    with pytest.raises(RemoteError, match="floating point"):
        await conn.call("forward", ints, ForwardResponse)
    info = await conn.call("info", InfoRequest(), InfoResponse)
    assert info.state == "online"


async def test_idle_sessions_expire(model_path: Path, pool: ConnectionPool) -> None:
    async with open_local_swarm(model_path) as local:
        limits = SessionLimits(idle_timeout=60.0)  # the reaper's timer stays out of the way
        s = await local.add_server(LayerRange(0, 6), limits=limits)
        handlers = s.server.handlers
        assert handlers is not None
        conn = await pool.get(s.ready.host, s.ready.port, s.ready.peer_id)
        async with conn.open_stream("inference", timeout=10) as stream:
            await stream.send(InferenceOpen(os.urandom(16), 8, 1, "float32", LayerRange(0, 6)))
            await stream.receive(InferenceReady)
            assert len(handlers.sessions) == 1
            assert handlers.sessions.close_idle(now=trio.current_time() + 61.0) == 1
            assert handlers.sessions.free_tokens == handlers.sessions.limits.cache_tokens
            with pytest.raises(RemoteError) as ended:  # the server ended it and says why
                await stream.receive(InferenceStepResult, timeout=10)
            assert ended.value.code is ErrorCode.SESSION and "without a step" in str(ended.value)


async def test_layers_auto_takes_the_least_served_blocks(model_path: Path) -> None:
    async with open_local_swarm(model_path, [LayerRange(0, 3)]) as local:
        auto = await local.add_server(None, num_blocks=3)
        assert auto.ready.layers == LayerRange(3, 6)
        everything = await local.add_server(None)  # num_blocks defaults to the whole model
        assert everything.ready.layers == LayerRange(0, 6)


async def test_a_server_announces_how_fast_its_next_server_delivered(model_path: Path) -> None:
    """Before it goes online a server probes the servers of the block after its range with a
    timed one-token ``forward`` and announces what they delivered (`PingEntry.tps`), which
    rebalancing counts them at (`swarm.directory.delivered_by_peers`)."""
    async with open_local_swarm(model_path, [LayerRange(3, 6)]) as local:
        second = await local.add_server(LayerRange(0, 3))
        first = local.servers[0].ready
        model = second.ready.model_id
        found = await local.dht.get_many(block_keys(model, 6))
        views = {v.peer_id: v for v in servers_from_records(found, model, 6)}
    measured = views[second.ready.peer_id].next_delivered
    assert set(measured) == {first.peer_id}
    assert 0 < measured[first.peer_id] <= 1e4
    assert delivered_by_peers(views.values()) == measured
