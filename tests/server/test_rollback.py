"""Speculative steps on a server: a step carries drafted tokens, the next step tells the
session how many cache tokens to keep, and nobody can roll back what was already built on.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import torch
import trio

from swarm.errors import RemoteError
from swarm.identity import Identity
from swarm.net.messages import (
    InferenceInput,
    InferenceOpen,
    InferenceReady,
    InferenceStepResult,
    InfoRequest,
    InfoResponse,
    PushRequest,
)
from swarm.net.pool import open_connection_pool
from swarm.testing.checkpoints import write_random_llama
from swarm.testing.swarm import LocalSwarm, open_local_swarm
from swarm.types import LayerRange

HIDDEN = 64


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rollback") / "tiny"
    write_random_llama(path, num_layers=2, hidden=HIDDEN, seed=3, std=0.1)
    return path


@pytest.fixture
async def one_server(model_path: Path) -> AsyncIterator[LocalSwarm]:
    async with open_local_swarm(model_path, [LayerRange(0, 2)]) as local:
        yield local


def _tokens(seed: int, n: int) -> torch.Tensor:
    return torch.randn(1, n, HIDDEN, generator=torch.Generator().manual_seed(seed))


async def _session(
    local: LocalSwarm, steps: Sequence[tuple[torch.Tensor, int, int | None]]
) -> list[torch.Tensor]:
    """Run ``steps`` (hidden, first position, keep) through one session; their outputs."""
    server = local.servers[0].ready
    outs = []
    async with open_connection_pool(Identity.generate()) as pool:
        conn = await pool.get(server.host, server.port, server.peer_id)
        async with conn.open_stream("inference", timeout=10) as stream:
            await stream.send(InferenceOpen(os.urandom(16), 32, 1, "float32", LayerRange(0, 2)))
            await stream.receive(InferenceReady)
            for step, (hidden, start, keep) in enumerate(steps):
                positions = torch.arange(start, start + hidden.shape[1]).view(1, -1)
                await stream.send(InferenceInput(step, hidden, positions, keep))
                outs.append((await stream.receive(InferenceStepResult)).hidden_states)
            await stream.send_end()
    return outs


async def test_rejected_drafts_leave_no_trace(one_server: LocalSwarm) -> None:
    prompt, token, drafts, nxt = _tokens(1, 5), _tokens(2, 1), _tokens(3, 3), _tokens(4, 1)
    with trio.fail_after(60):
        plain = await _session(one_server, [(prompt, 0, None), (token, 5, None), (nxt, 6, None)])
        # the same, but the second step also carries 3 drafts, all rejected: keep 6 tokens
        spec = await _session(
            one_server,
            [(prompt, 0, None), (torch.cat([token, drafts], 1), 5, None), (nxt, 6, 6)],
        )
    torch.testing.assert_close(spec[1][:, :1], plain[1])  # the drafts do not change it
    torch.testing.assert_close(spec[2], plain[2])  # nor what follows the rollback
    # two drafts accepted: keep 8, the next token at position 8
    with trio.fail_after(60):
        accepted = await _session(
            one_server,
            [(prompt, 0, None), (torch.cat([token, drafts], 1), 5, None), (nxt, 8, 8)],
        )
        straight = await _session(
            one_server, [(prompt, 0, None), (torch.cat([token, drafts[:, :2]], 1), 5, None),
                         (nxt, 8, None)],
        )  # fmt: skip
    torch.testing.assert_close(accepted[2], straight[2])


@pytest.mark.parametrize("keep", [4, 10])
async def test_a_rollback_before_the_last_step_or_past_the_cache_is_refused(
    one_server: LocalSwarm, keep: int
) -> None:
    """The last step began at 5 tokens and the cache holds 9: keep must be in 5..9."""
    steps = [(_tokens(1, 5), 0, None), (_tokens(2, 4), 5, None), (_tokens(3, 1), keep, keep)]
    with (
        trio.fail_after(60),
        pytest.RaisesGroup(
            pytest.RaisesExc(RemoteError, match="cannot roll back"),
            allow_unwrapped=True,
            flatten_subgroups=True,
        ),
    ):
        await _session(one_server, steps)


async def test_only_the_named_predecessor_can_push_a_rollback(one_server: LocalSwarm) -> None:
    """A stranger who knows the session id cannot push a step (with a rollback or not)."""
    server = one_server.servers[0].ready
    predecessor, stranger = Identity.generate(), Identity.generate()
    session_id = os.urandom(16)
    prompt, token = _tokens(1, 5), _tokens(2, 1)
    with trio.fail_after(60):
        async with (
            open_connection_pool(Identity.generate()) as client,
            open_connection_pool(stranger) as evil,
        ):
            conn = await client.get(server.host, server.port, server.peer_id)
            async with conn.open_stream("inference", timeout=10) as stream:
                opened = InferenceOpen(
                    session_id, 32, 1, "float32", LayerRange(0, 2), push_from=predecessor.peer_id
                )
                await stream.send(opened)
                await stream.receive(InferenceReady)
                await stream.send(InferenceInput(0, prompt, torch.arange(5).view(1, -1)))
                first = await stream.receive(InferenceStepResult)
                bad = await evil.get(server.host, server.port, server.peer_id)
                garbage = PushRequest(session_id, 1, _tokens(9, 1), torch.tensor([[0]]), 0)
                await bad.notify("push", garbage)
                await bad.call("info", InfoRequest(), InfoResponse)  # the notify was handled
                await stream.send(InferenceInput(1, token, torch.tensor([[5]]), 5))
                got = await stream.receive(InferenceStepResult)
                await stream.send_end()
    alone = await _session(one_server, [(prompt, 0, None), (token, 5, None)])
    torch.testing.assert_close(first.hidden_states, alone[0])
    torch.testing.assert_close(got.hidden_states, alone[1])
