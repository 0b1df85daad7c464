"""Helpers for session tests against fake servers: a 6-layer checkpoint, step inputs, the
single-process reference, and a session over fake servers."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import torch
import trio

from swarm.client.chain import Chain
from swarm.client.config import ClientConfig
from swarm.client.discovery import StaticDirectory
from swarm.identity import Identity
from swarm.net.pool import open_connection_pool
from swarm.shards import KVCache, Span, load_span
from swarm.testing.checkpoints import write_random_llama
from swarm.types import LayerRange

from .fake_server import FakeServer

LAYERS = 6
HIDDEN = 64


def make_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_llama(tmp_path_factory.mktemp("ckpt") / "tiny", num_layers=LAYERS)


def make_full_span(checkpoint: Path) -> Span:
    return load_span(checkpoint, LayerRange(0, LAYERS))


def make_inputs(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A 5-token prefill then four single-token steps."""
    gen = torch.Generator().manual_seed(seed)
    steps, pos = [], 0
    for n in (5, 1, 1, 1, 1):
        hidden = torch.randn(1, n, HIDDEN, generator=gen)  # (batch, n, hidden)
        positions = torch.arange(pos, pos + n).unsqueeze(0)  # (batch, n)
        steps.append((hidden, positions))
        pos += n
    return steps


def reference_outputs(
    span: Span, steps: list[tuple[torch.Tensor, torch.Tensor]]
) -> list[torch.Tensor]:
    cache = KVCache.allocate(span.config, span.layers, 1, 32)
    with torch.inference_mode():
        return [span(h, p, cache) for h, p in steps]


def make_servers(checkpoint: Path, ranges: list[tuple[int, int]]) -> list[FakeServer]:
    return [
        FakeServer(load_span(checkpoint, LayerRange(a, b)), Identity.from_seed(f"s{i}".encode()))
        for i, (a, b) in enumerate(ranges)
    ]


@asynccontextmanager
async def open_session(
    servers: list[FakeServer], config: ClientConfig, throughputs: list[float] | None = None
) -> AsyncIterator[Chain]:
    tps = throughputs or [100.0] * len(servers)
    directory = StaticDirectory([s.view(t) for s, t in zip(servers, tps, strict=True)])
    async with open_connection_pool(config.identity) as pool:
        async with Chain.open(
            pool,
            directory,
            config,
            layers=LayerRange(0, LAYERS),
            max_length=32,
            rng=random.Random(0),
        ) as session:
            yield session


async def run_all(
    session: Chain, steps: list[tuple[torch.Tensor, torch.Tensor]]
) -> list[torch.Tensor]:
    with trio.fail_after(30):
        return [(await session.step(h, p)).output for h, p in steps]


def assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
