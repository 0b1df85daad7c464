"""In-process swarms with emulated links: routing by latency and capacity, a hanging
server abandoned at its deadline, a server that stalls mid-generation raced by its replica
(hedged step, pushes rewired), and many clients at once."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from contextlib import aclosing
from pathlib import Path

import pytest
import torch
import trio

from swarm.client.config import ClientConfig, HedgeConfig
from swarm.client.model import AsyncRemoteModel, GenerationResult, Token
from swarm.net.messages import PushRequest
from swarm.net.methods import HandlerRegistry
from swarm.net.rpc import CallContext
from swarm.server.compute import Priority
from swarm.server.handlers import ServingHandlers
from swarm.server.sessions import SessionLimits
from swarm.shards import KVCache, Span
from swarm.testing.adversaries import hanging
from swarm.testing.links import LinkEmulator, LinkSpec
from swarm.testing.swarm import LocalServer, LocalSwarm, open_local_swarm
from swarm.types import LayerRange, PeerId

from .conftest import NEW_TOKENS, PROMPT

pytestmark = pytest.mark.slow  # emulated link delays and real step deadlines

SLOW = LinkSpec(delay=0.04)


def ports(result: GenerationResult) -> list[int]:
    return [hop["port"] for hop in result.route]


def routing_only(local: LocalSwarm) -> ClientConfig:
    """A client whose route is the planner's alone (every server pinged, no hedging: a step
    that a loaded machine stalls past the hedge floor does not swap a hop for a replica)."""
    return local.client_config(hedging=HedgeConfig(after=None))


def slow_down(links: LinkEmulator, server: LocalServer, dialers: list[str]) -> None:
    for dialer in dialers:
        links.set(dialer, server.address, SLOW)


async def test_routes_avoid_a_slow_replica(model12: Path, reference: list[int]) -> None:
    spans = [LayerRange(0, 6), LayerRange(0, 12), LayerRange(6, 12)]
    with trio.fail_after(120):
        async with LinkEmulator() as links, open_local_swarm(model12, links=links) as local:
            s0, s1, s2 = [await local.add_server(layers) for layers in spans]
            config = routing_only(local)
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
    one_session = SessionLimits(
        cache_tokens=len(PROMPT) + NEW_TOKENS, peer_cache_share=1.0, host_cache_share=1.0
    )
    with trio.fail_after(120):
        async with LinkEmulator() as links, open_local_swarm(model12, links=links) as local:
            s0 = await local.add_server(LayerRange(0, 6))
            s1 = await local.add_server(LayerRange(0, 12), limits=one_session)
            s2 = await local.add_server(LayerRange(6, 12))
            slow_down(links, s0, ["client"])  # the whole-model server is the best route
            config = routing_only(local)
            transport = links.transport("client")
            async with (
                AsyncRemoteModel.open(model12, config, transport=transport) as first,
                AsyncRemoteModel.open(model12, config, transport=transport) as second,
            ):
                async with aclosing(first.stream(PROMPT, NEW_TOKENS)) as tokens:
                    first_token = await tokens.__anext__()  # first holds s1's whole cache now
                    assert isinstance(first_token, Token)
                    got = [first_token.id]
                    assert ports(tokens.result) == [s1.ready.port]
                    result = await second.generate_detailed(PROMPT, NEW_TOKENS)
                    assert result.ids == reference
                    assert ports(result) == [s0.ready.port, s2.ready.port]
                    got += [token.id async for token in tokens if isinstance(token, Token)]
                assert got == reference


async def test_hanging_server_is_abandoned_at_its_deadline(
    model12: Path, reference: list[int]
) -> None:
    with trio.fail_after(120):
        async with LinkEmulator() as links, open_local_swarm(model12, links=links) as local:
            await local.add_server(LayerRange(0, 6))
            hang = await local.add_server(LayerRange(6, 12), wrap_handlers=hanging)
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


class StallingHandlers(ServingHandlers):
    """Honest for ``after`` inference steps; the next one never finishes (a stopped process,
    as far as its sessions can tell) and it counts the pushes it accepted, by sender."""

    def __init__(self, honest: ServingHandlers, after: int | None) -> None:
        super().__init__(
            honest.config, honest.span, honest.state, honest.sessions, honest.queue, honest.pool
        )
        self.after = after
        self.steps = 0
        self.pushes: Counter[PeerId] = Counter()

    async def compute(
        self,
        span: Span,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None,
        priority: Priority,
    ) -> torch.Tensor:
        if priority is Priority.INFERENCE:
            self.steps += 1
            if self.after is not None and self.steps > self.after:
                await trio.sleep_forever()
        return await super().compute(span, hidden, positions, cache, priority)

    def take_push(self, request: PushRequest, ctx: CallContext) -> bool:
        accepted = super().take_push(request, ctx)
        if accepted:
            self.pushes[ctx.peer_id] += 1
        return accepted


def stalling(into: list[StallingHandlers], after: int | None = None) -> Callable[..., object]:
    def wrap(honest: ServingHandlers) -> HandlerRegistry:
        into.append(StallingHandlers(honest, after))
        return into[-1].registry()

    return wrap


async def test_a_stalled_middle_hop_is_raced_by_its_replica(
    model12: Path, reference: list[int]
) -> None:
    stall_at = 5  # steps 0-4 answered (the prefill and four tokens), step 5 never
    handlers: list[StallingHandlers] = []  # of server1 (the staller), server2, server3
    with trio.fail_after(120):
        async with LinkEmulator() as links, open_local_swarm(model12, links=links) as local:
            s0 = await local.add_server(LayerRange(0, 4))
            staller = await local.add_server(
                LayerRange(4, 8), wrap_handlers=stalling(handlers, stall_at)
            )
            s2 = await local.add_server(LayerRange(8, 12), wrap_handlers=stalling(handlers))
            replica = await local.add_server(LayerRange(4, 8), wrap_handlers=stalling(handlers))
            slow_down(links, replica, ["client", "server0"])  # the staller looks better
            # every server pinged (a full run once routed around the staller from the start:
            # with four servers on one host a default client pings only some), 30 s step timeout
            config = local.client_config()
            async with AsyncRemoteModel.open(
                model12, config, transport=links.transport("client")
            ) as model:
                result = await model.generate_detailed(PROMPT, NEW_TOKENS)
                bans = model.bans
    assert result.ids == reference
    assert handlers[0].steps > stall_at  # the staller was the first route's middle hop
    assert ports(result) == [s0.ready.port, replica.ready.port, s2.ready.port]
    assert result.recoveries == 0
    assert max(result.timings) < config.step_timeout / 4  # a hedge, not a step timeout
    assert not bans.is_banned(staller.ready.peer_id)
    assert bans.penalties.penalty(staller.ready.peer_id) > 0
    # pushes rewired: every later step reached the replica by push from server0 and went on
    # to server2 by push from the replica (one lost push each allowed: the client covers it)
    _, at_s2, at_replica = handlers
    later = NEW_TOKENS - 1 - stall_at
    assert at_replica.pushes[s0.ready.peer_id] >= later - 1
    assert at_s2.pushes[replica.ready.peer_id] >= later - 1


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
