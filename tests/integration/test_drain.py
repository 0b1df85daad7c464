"""A server stopped cleanly mid-generation: its clients move on to a replica without a ban
or a failure being reported, and get the same tokens."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from swarm.client.config import ClientConfig, HedgeConfig
from swarm.client.model import AsyncRemoteModel, Token
from swarm.testing.swarm import open_local_swarm
from swarm.types import LayerRange

from .conftest import NEW_TOKENS, PROMPT

pytestmark = pytest.mark.slow  # a real drain and its grace period, in real time


async def test_a_draining_server_is_left_without_a_ban(
    model12: Path, reference: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="swarm")
    with trio.fail_after(120):
        async with open_local_swarm(model12) as local:
            await local.add_server(LayerRange(0, 12))
            await local.add_server(LayerRange(0, 12))
            config = ClientConfig(
                initial_peers=(local.dht_address,), hedging=HedgeConfig(after=None)
            )
            async with AsyncRemoteModel.open(model12, config) as model:
                got: list[int] = []
                async with model.stream(PROMPT, NEW_TOKENS) as tokens:
                    async for token in tokens:
                        if not isinstance(token, Token):
                            continue
                        got.append(token.id)
                        if len(got) == 5:
                            port = tokens.result.route[0]["port"]
                            index = next(
                                i for i, s in enumerate(local.servers) if s.ready.port == port
                            )
                            draining = local.servers[index]
                            draining.server.drain_timeout = 0.0  # it ends our session at once
                            draining.server.request_stop()
                    result = tokens.result
                peer = draining.ready.peer_id
                assert not model.bans.is_banned(peer)
    assert result.ids == reference and got == reference
    assert result.recoveries == 1
    assert all(hop["port"] != draining.ready.port for hop in result.route)
    assert "banning" not in caplog.text
    assert "shutting down" in caplog.text  # the client was told why, and moved on
