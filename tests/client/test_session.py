"""InferenceSession against fake in-process servers: outputs, push on/off, recovery."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import torch
import trio

from swarm.client.config import ClientConfig
from swarm.client.discovery import StaticDirectory
from swarm.client.session import InferenceSession
from swarm.errors import RoutingError, SessionError
from swarm.identity import Identity
from swarm.net.pool import open_connection_pool
from swarm.shards import KVCache, Span, load_span
from swarm.testing.checkpoints import write_random_llama
from swarm.types import LayerRange

from .fake_server import FakeServer, run_servers

LAYERS = 6
HIDDEN = 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_llama(tmp_path_factory.mktemp("ckpt") / "tiny", num_layers=LAYERS)


@pytest.fixture(scope="module")
def full_span(checkpoint: Path) -> Span:
    return load_span(checkpoint, LayerRange(0, LAYERS))


def _inputs(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A 5-token prefill then four single-token steps."""
    gen = torch.Generator().manual_seed(seed)
    steps, pos = [], 0
    for n in (5, 1, 1, 1, 1):
        hidden = torch.randn(1, n, HIDDEN, generator=gen)  # (batch, n, hidden)
        positions = torch.arange(pos, pos + n).unsqueeze(0)  # (batch, n)
        steps.append((hidden, positions))
        pos += n
    return steps


def _reference(span: Span, steps: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    cache = KVCache.allocate(span.config, span.layers, 1, 32)
    with torch.inference_mode():
        return [span(h, p, cache) for h, p in steps]


def _servers(checkpoint: Path, ranges: list[tuple[int, int]]) -> list[FakeServer]:
    return [
        FakeServer(load_span(checkpoint, LayerRange(a, b)), Identity.from_seed(f"s{i}".encode()))
        for i, (a, b) in enumerate(ranges)
    ]


@asynccontextmanager
async def _session(
    servers: list[FakeServer], config: ClientConfig, throughputs: list[float] | None = None
) -> AsyncIterator[InferenceSession]:
    tps = throughputs or [100.0] * len(servers)
    directory = StaticDirectory([s.view(t) for s, t in zip(servers, tps, strict=True)])
    async with open_connection_pool(config.identity) as pool:
        async with InferenceSession.open(
            pool,
            directory,
            config,
            layers=LayerRange(0, LAYERS),
            max_length=32,
            rng=random.Random(0),
        ) as session:
            yield session


async def _run_all(
    session: InferenceSession, steps: list[tuple[torch.Tensor, torch.Tensor]]
) -> list[torch.Tensor]:
    with trio.fail_after(30):
        return [await session.step(h, p) for h, p in steps]


def _assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("use_push", [True, False])
async def test_three_hops_match_one_process(
    checkpoint: Path, full_span: Span, use_push: bool
) -> None:
    steps = _inputs()
    servers = _servers(checkpoint, [(0, 2), (2, 4), (4, 6)])
    config = ClientConfig(use_push=use_push, push_grace=5.0)
    async with run_servers(servers), _session(servers, config) as session:
        assert [h.layers for h in session.route] == [
            LayerRange(0, 2),
            LayerRange(2, 4),
            LayerRange(4, 6),
        ]
        got = await _run_all(session, steps)
    _assert_same(got, _reference(full_span, steps))
    if use_push:  # hops 2 and 3 got every input by push, none from the client
        assert [s.steps_from_client for s in servers] == [5, 0, 0]
        assert [s.steps_from_push for s in servers] == [0, 5, 5]
    else:
        assert [s.steps_from_client for s in servers] == [5, 5, 5]
        assert [s.steps_from_push for s in servers] == [0, 0, 0]


@pytest.mark.parametrize("mode", ["die", "hang"])
@pytest.mark.parametrize("use_push", [True, False])
async def test_failed_hop_is_replaced_with_the_same_outputs(
    checkpoint: Path, full_span: Span, mode: str, use_push: bool
) -> None:
    steps = _inputs(1)
    # the middle hop [2,4) is preferred (fast); a slow replica [2,6) exists
    servers = _servers(checkpoint, [(0, 2), (2, 4), (4, 6), (2, 6)])
    if mode == "die":
        servers[1].die_at_step = 3
    else:
        servers[1].hang_at_step = 3
    config = ClientConfig(use_push=use_push, step_timeout=1.0, push_grace=0.3)
    async with (
        run_servers(servers),
        _session(servers, config, [100.0, 100.0, 100.0, 1.0]) as session,
    ):
        assert servers[1].identity.peer_id in {h.server.peer_id for h in session.route}
        got = await _run_all(session, steps)
        route = session.route
        stats = session.statistics()
    _assert_same(got, _reference(full_span, steps))
    assert stats.recoveries == 1
    assert servers[1].identity.peer_id not in {h.server.peer_id for h in route}
    assert servers[3].identity.peer_id in {h.server.peer_id for h in route}
    assert session.bans.is_banned(servers[1].identity.peer_id)


async def test_refused_open_goes_elsewhere(checkpoint: Path, full_span: Span) -> None:
    steps = _inputs(2)
    servers = _servers(checkpoint, [(0, 6), (0, 6)])
    servers[0].refuse_open = True
    async with run_servers(servers), _session(servers, ClientConfig(), [1000.0, 1.0]) as session:
        assert [h.server.peer_id for h in session.route] == [servers[1].identity.peer_id]
        got = await _run_all(session, steps)
    _assert_same(got, _reference(full_span, steps))


async def test_no_replacement_is_a_clear_error(checkpoint: Path) -> None:
    servers = _servers(checkpoint, [(0, 3), (3, 6)])
    servers[1].die_at_step = 1
    config = ClientConfig(step_timeout=1.0, push_grace=0.3)
    async with run_servers(servers), _session(servers, config) as session:
        with pytest.raises(RoutingError, match="banned"):
            await _run_all(session, _inputs())


async def test_wrong_input_is_not_retried(checkpoint: Path) -> None:
    servers = _servers(checkpoint, [(0, 6), (0, 6)])
    async with run_servers(servers), _session(servers, ClientConfig()) as session:
        with pytest.raises(SessionError, match="wrong hidden size"):
            await session.step(torch.zeros(1, 2, HIDDEN + 1), torch.arange(2).unsqueeze(0))
        assert session.recoveries == 0


async def test_too_many_recoveries(checkpoint: Path) -> None:
    servers = _servers(checkpoint, [(0, 6), (0, 6)])
    for s in servers:
        s.hang_at_step = 1
    config = ClientConfig(step_timeout=0.5, max_recoveries=1)
    async with run_servers(servers), _session(servers, config) as session:
        with pytest.raises((SessionError, RoutingError)):
            await _run_all(session, _inputs())
