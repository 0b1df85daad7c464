"""In-process swarms with emulated links: routing by latency and capacity, a hanging
server abandoned at its deadline, and many clients at once."""

from __future__ import annotations

from contextlib import aclosing
from pathlib import Path

import trio

from swarm.client.config import ClientConfig
from swarm.client.model import AsyncRemoteModel, GenerationResult
from swarm.server.sessions import SessionLimits
from swarm.testing.adversaries import HangingHandlers
from swarm.testing.links import LinkEmulator, LinkSpec
from swarm.testing.swarm import LocalServer, open_local_swarm
from swarm.types import LayerRange

from .conftest import NEW_TOKENS, PROMPT

SLOW = LinkSpec(delay=0.04)


def ports(result: GenerationResult) -> list[int]:
    return [hop["port"] for hop in result.route]


def slow_down(links: LinkEmulator, server: LocalServer, dialers: list[str]) -> None:
    for dialer in dialers:
        links.set(dialer, server.address, SLOW)


async def test_routes_avoid_a_slow_replica(model12: Path, reference: list[int]) -> None:
    spans = [LayerRange(0, 6), LayerRange(0, 12), LayerRange(6, 12)]
    with trio.fail_after(120):
        async with LinkEmulator() as links, open_local_swarm(model12, links=links) as local:
            s0, s1, s2 = [await local.add_server(layers) for layers in spans]
            config = ClientConfig(initial_peers=(local.dht_address,))
            slow_down(links, s1, ["client"])
            async with AsyncRemoteModel.open(
                model12, config, transport=links.transport("client")
            ) as model:
                result = await model.generate_detailed(PROMPT, NEW_TOKENS)
                assert result.ids == reference
                assert ports(result) == [s0.ready.port, s2.ready.port]
            # now the two halves are far away and the whole-model replica is near
            links.set("client", s1.address, LinkSpec())
            slow_down(links, s0, ["client"])
            slow_down(links, s2, ["client", "server0"])
            async with AsyncRemoteModel.open(
                model12, config, transport=links.transport("client")
            ) as model:
                result = await model.generate_detailed(PROMPT, NEW_TOKENS)
                assert result.ids == reference
                assert ports(result) == [s1.ready.port]


async def test_full_cache_sends_new_sessions_elsewhere(model12: Path, reference: list[int]) -> None:
    one_session = SessionLimits(cache_tokens=len(PROMPT) + NEW_TOKENS)
    with trio.fail_after(120):
        async with LinkEmulator() as links, open_local_swarm(model12, links=links) as local:
            s0 = await local.add_server(LayerRange(0, 6))
            s1 = await local.add_server(LayerRange(0, 12), limits=one_session)
            s2 = await local.add_server(LayerRange(6, 12))
            slow_down(links, s0, ["client"])  # the whole-model server is the best route
            config = ClientConfig(initial_peers=(local.dht_address,))
            transport = links.transport("client")
            async with (
                AsyncRemoteModel.open(model12, config, transport=transport) as first,
                AsyncRemoteModel.open(model12, config, transport=transport) as second,
            ):
                async with aclosing(first.stream(PROMPT, NEW_TOKENS)) as tokens:
                    got = [(await tokens.__anext__()).id]  # first holds s1's whole cache now
                    assert ports(tokens.result) == [s1.ready.port]
                    result = await second.generate_detailed(PROMPT, NEW_TOKENS)
                    assert result.ids == reference
                    assert ports(result) == [s0.ready.port, s2.ready.port]
                    got += [token.id async for token in tokens]
                assert got == reference


async def test_hanging_server_is_abandoned_at_its_deadline(
    model12: Path, reference: list[int]
) -> None:
    with trio.fail_after(120):
        async with LinkEmulator() as links, open_local_swarm(model12, links=links) as local:
            await local.add_server(LayerRange(0, 6))
            hang = await local.add_server(LayerRange(6, 12), wrap_handlers=HangingHandlers)
            honest = await local.add_server(LayerRange(6, 12))
            slow_down(links, honest, ["client", "server0"])  # the liar looks better
            config = ClientConfig(initial_peers=(local.dht_address,), step_timeout=2.0)
            async with AsyncRemoteModel.open(
                model12, config, transport=links.transport("client")
            ) as model:
                result = await model.generate_detailed(PROMPT, NEW_TOKENS)
                assert result.ids == reference
                assert result.recoveries >= 1
                assert hang.ready.port not in ports(result)
                assert honest.ready.port in ports(result)


async def test_eight_clients_at_once(model12: Path, reference: list[int]) -> None:
    spans = [LayerRange(0, 4), LayerRange(4, 8), LayerRange(8, 12)]
    results: list[list[int]] = []
    with trio.fail_after(180):
        async with open_local_swarm(model12, spans) as local:
            config = ClientConfig(initial_peers=(local.dht_address,))

            async def client() -> None:
                async with AsyncRemoteModel.open(model12, config) as model:
                    ids = await model.generate(PROMPT, NEW_TOKENS)
                    assert isinstance(ids, list)
                    results.append(ids)

            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(client)
    assert results == [reference] * 8
