"""Pushes are bound to the peer a session names, and errors reach peers as codes only."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
import trio

from swarm.errors import ErrorCode, RemoteError
from swarm.identity import Identity
from swarm.net.messages import (
    InferenceInput,
    InferenceOpen,
    InferenceReady,
    InferenceStepResult,
    InfoRequest,
    InfoResponse,
    NewPusher,
    PushRequest,
)
from swarm.net.methods import HandlerRegistry
from swarm.net.pool import open_connection_pool
from swarm.net.rpc import CallContext
from swarm.net.surface import INFO
from swarm.server.handlers import ServingHandlers
from swarm.testing.checkpoints import write_random_llama
from swarm.testing.swarm import LocalServer, LocalSwarm, open_local_swarm
from swarm.types import LayerRange

HIDDEN = 64


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("push") / "tiny"
    write_random_llama(path, num_layers=4, hidden=HIDDEN, seed=5, std=0.1)
    return path


@pytest.fixture
async def one_server(model_path: Path) -> AsyncIterator[LocalSwarm]:
    async with open_local_swarm(model_path, [LayerRange(0, 4)]) as local:
        yield local


def _step_input(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = torch.randn(1, 3, HIDDEN, generator=torch.Generator().manual_seed(seed))
    return hidden, torch.arange(3).view(1, 3)


async def _forward_alone(
    server: LocalServer, hidden: torch.Tensor, pos: torch.Tensor
) -> torch.Tensor:
    async with open_connection_pool(Identity.generate()) as pool:
        conn = await pool.get(server.ready.host, server.ready.port, server.ready.peer_id)
        async with conn.open_stream("inference", timeout=10) as stream:
            await stream.send(InferenceOpen(os.urandom(16), 8, 1, "float32", LayerRange(0, 4)))
            await stream.receive(InferenceReady)
            await stream.send(InferenceInput(0, hidden, pos))
            result = await stream.receive(InferenceStepResult)
            await stream.send_end()
    return result.hidden_states


async def test_a_third_peer_cannot_inject_an_input(one_server: LocalSwarm) -> None:
    server = one_server.servers[0]
    real, pos = _step_input(1)
    garbage, _ = _step_input(2)
    want = await _forward_alone(server, real, pos)
    predecessor, attacker = Identity.generate(), Identity.generate()
    session_id = os.urandom(16)
    with trio.fail_after(30):
        async with (
            open_connection_pool(Identity.generate()) as client,
            open_connection_pool(attacker) as evil,
            open_connection_pool(predecessor) as prev,
        ):
            host, port, peer = server.ready.host, server.ready.port, server.ready.peer_id
            conn = await client.get(host, port, peer)
            async with conn.open_stream("inference", timeout=10) as stream:
                opened = InferenceOpen(
                    session_id,
                    8,
                    1,
                    "float32",
                    LayerRange(0, 4),
                    push_from=predecessor.peer_id,
                )
                await stream.send(opened)
                await stream.receive(InferenceReady)
                # the attacker knows the session id and races its input in first
                bad = await evil.get(host, port, peer)
                await bad.notify("push", PushRequest(session_id, 0, garbage, pos))
                await bad.call("info", InfoRequest(), InfoResponse)  # the notify was handled
                await stream.send(InferenceInput(0, real, pos))
                got = await stream.receive(InferenceStepResult)
                torch.testing.assert_close(got.hidden_states, want)
                # the named predecessor may push step 1 (the client then need not send it)
                nxt, pos1 = _step_input(3)
                pos1 = pos1 + 3
                good = await prev.get(host, port, peer)
                await good.notify("push", PushRequest(session_id, 1, nxt, pos1))
                pushed = await stream.receive(InferenceStepResult)
                assert pushed.step == 1
                await stream.send_end()


async def test_recovery_moves_the_binding(one_server: LocalSwarm) -> None:
    """A step message may name a new predecessor; the old one is refused from then on."""
    server = one_server.servers[0]
    first, second = Identity.generate(), Identity.generate()
    session_id = os.urandom(16)
    x0, pos0 = _step_input(4)
    x1, _ = _step_input(5)
    with trio.fail_after(30):
        async with (
            open_connection_pool(Identity.generate()) as client,
            open_connection_pool(first) as old,
            open_connection_pool(second) as new,
        ):
            host, port, peer = server.ready.host, server.ready.port, server.ready.peer_id
            conn = await client.get(host, port, peer)
            async with conn.open_stream("inference", timeout=10) as stream:
                opened = InferenceOpen(
                    session_id, 8, 1, "float32", LayerRange(0, 4), push_from=first.peer_id
                )
                await stream.send(opened)
                await stream.receive(InferenceReady)
                await stream.send(NewPusher(second.peer_id))
                await conn.call("info", InfoRequest(), InfoResponse)
                stale = await old.get(host, port, peer)
                await stale.notify("push", PushRequest(session_id, 0, x1, pos0))
                await stale.call("info", InfoRequest(), InfoResponse)
                fresh = await new.get(host, port, peer)
                await fresh.notify("push", PushRequest(session_id, 0, x0, pos0))
                got = await stream.receive(InferenceStepResult)
                want = await _forward_alone(server, x0, pos0)
                torch.testing.assert_close(got.hidden_states, want)
                await stream.send_end()


async def test_handler_errors_reach_peers_as_codes_only(model_path: Path) -> None:
    """A failure inside a handler: the peer gets `internal` and a fixed text, not ours."""

    async def broken(request: InfoRequest, ctx: CallContext) -> InfoResponse:
        raise KeyError("secret internal detail /home/op/.config")

    def wrap(honest: ServingHandlers) -> HandlerRegistry:  # the handler-wrapping seam
        return honest.registry().replace(INFO.bind(broken))

    async with (
        open_local_swarm(model_path) as local,
        open_connection_pool(Identity.generate()) as pool,
    ):
        server = await local.add_server(LayerRange(0, 4), wrap_handlers=wrap)
        conn = await pool.get(server.ready.host, server.ready.port, server.ready.peer_id)
        with pytest.raises(RemoteError) as info:
            await conn.call("info", InfoRequest(), InfoResponse)
        assert info.value.code is ErrorCode.INTERNAL
        assert "secret" not in str(info.value) and "KeyError" not in str(info.value)
        with pytest.raises(RemoteError) as unknown:
            await conn.call("no_such_method", InfoRequest(), InfoResponse)
        assert unknown.value.code is ErrorCode.NOT_FOUND
