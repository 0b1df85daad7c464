"""Reachability and relays in one process on loopback: dial-back majorities (a liar cannot
flip one alone), a server that accepts nothing joining through relays, a generation through
it with pushes into and out of it, and a relay killed mid-generation."""

from __future__ import annotations

import dataclasses
from contextlib import AsyncExitStack, aclosing
from pathlib import Path

import pytest
import trio

from swarm.client.config import ClientConfig
from swarm.client.generation import Token
from swarm.client.model import AsyncRemoteModel
from swarm.identity import Identity
from swarm.net.pool import open_connection_pool
from swarm.net.punch import PunchConfig
from swarm.net.surface import call_info
from swarm.server.reachability import ReachabilityConfig, decide
from swarm.testing.reach import NeverPunches, RelayNode, Undialable, open_relay_node
from swarm.testing.swarm import LocalSwarm, open_local_swarm
from swarm.types import LayerRange, Reachability

from .conftest import NEW_TOKENS, PROMPT

pytestmark = pytest.mark.slow  # in-process swarms with relays, on real deadlines

R, U, N = Reachability.REACHABLE, Reachability.UNREACHABLE, Reachability.UNKNOWN
# ask every helper, keep relays fixed (servers here do not relay for each other); no direct
# upgrades where a test is about the relayed path (they are on by default)
REACH = ReachabilityConfig(
    helpers=9, check_timeout=5.0, retry=0.3, offer_relay=False, port_mapping=False, direct=None
)


def test_the_majority_of_votes_decides() -> None:
    assert decide([R, R, U]).verdict == R
    assert decide([U, U, R]).verdict == U
    assert decide([R, U]).verdict == N  # a tie decides nothing
    assert decide([R, N, N]).verdict == R  # abstentions do not count
    assert decide([]).verdict == N
    report = decide([R, U, U, N])
    assert (report.reachable, report.unreachable, report.abstained) == (1, 2, 1)


async def relays(stack: AsyncExitStack, local: LocalSwarm, n: int) -> list[RelayNode]:
    return [await stack.enter_async_context(open_relay_node(local.dht_address)) for _ in range(n)]


async def test_reachable_and_unreachable_each_within_a_deadline_despite_a_liar(
    model12: Path,
) -> None:
    with trio.fail_after(120):
        async with open_local_swarm(model12) as local, AsyncExitStack() as stack:
            await relays(stack, local, 2)
            await stack.enter_async_context(open_relay_node(local.dht_address, lie=U))
            with trio.fail_after(30):
                direct = await local.add_server(LayerRange(0, 12), reachability=REACH)
            assert direct.ready.reachability == R and direct.ready.relays == ()
            report = direct.server.reachability.report  # type: ignore[union-attr]
            assert (report.reachable, report.unreachable) == (2, 1)

            await stack.enter_async_context(open_relay_node(local.dht_address, lie=R))
            await stack.enter_async_context(open_relay_node(local.dht_address, lie=R))
            await relays(stack, local, 1)  # now 3 honest helpers, 2 liars saying reachable
            with trio.fail_after(30):
                hidden = await local.add_server(
                    LayerRange(0, 12), reachability=REACH, transport=Undialable()
                )
            assert hidden.ready.reachability == U
            assert len(hidden.ready.relays) == 2
            report = hidden.server.reachability.report  # type: ignore[union-attr]
            assert (report.reachable, report.unreachable) == (2, 4)  # 3 honest + the first liar

            # `info` through the relay says so too
            async with open_connection_pool(Identity.generate()) as pool:
                host, port = hidden.ready.relays[0].rsplit(":", 1)
                conn = await pool.get(host, int(port), hidden.ready.peer_id)
                info = await call_info(conn)
            assert info.reachability == U and info.relayed


async def test_a_generation_through_a_relayed_middle_server(
    model12: Path, reference: list[int]
) -> None:
    with trio.fail_after(180):
        async with open_local_swarm(model12) as local, AsyncExitStack() as stack:
            nodes = await relays(stack, local, 2)
            await local.add_server(LayerRange(0, 4), reachability=REACH)
            middle = await local.add_server(
                LayerRange(4, 8), reachability=REACH, transport=Undialable()
            )
            await local.add_server(LayerRange(8, 12), reachability=REACH)
            assert middle.ready.reachability == U and len(middle.ready.relays) == 2
            config = ClientConfig(initial_peers=(local.dht_address,), direct=None)
            async with AsyncRemoteModel.open(model12, config) as model:
                result = await model.generate_detailed(PROMPT, NEW_TOKENS)
            assert result.ids == reference
            assert [hop["path"] for hop in result.route] == ["direct", "relayed", "direct"]
            # the client's circuit and the first server's push both went through a relay
            assert sum(n.relay.statistics().circuits_total for n in nodes) >= 2
            assert middle.server.handlers is not None
            assert middle.server.hole_punch is None  # --no-direct: no punches answered either


async def test_a_relayed_server_reached_by_direct_connections(
    model12: Path, reference: list[int]
) -> None:
    """By default (``ClientConfig.direct`` and ``ReachabilityConfig.direct`` on), the pings
    reach the relayed server through its relay, then a simultaneous open coordinated over
    each such channel gives a direct one, and the generation (the client's steps and the
    first server's pushes) runs on them (loopback: no NAT in between, see
    tests/net/test_punch.py)."""
    with trio.fail_after(120):
        async with open_local_swarm(model12) as local, AsyncExitStack() as stack:
            nodes = await relays(stack, local, 2)
            default = dataclasses.replace(REACH, direct=ReachabilityConfig().direct)
            hidden = await local.add_server(
                LayerRange(6, 12), reachability=default, transport=Undialable()
            )
            assert hidden.ready.reachability == U and len(hidden.ready.relays) == 2
            first = await local.add_server(LayerRange(0, 6), reachability=default)
            assert first.server.announcer is not None
            with trio.fail_after(10):  # the punch runs beside the relayed channel
                while not first.server.announcer.pool.is_direct(hidden.ready.peer_id):
                    await trio.sleep(0.05)  # for pushes
            default_punch = ClientConfig(initial_peers=()).direct
            assert default_punch is not None  # on by default
            # the default but for how long the refresh waits for the punch (0.5 s, ample on
            # loopback): a long wait keeps the first route's path deterministic under load
            punch = dataclasses.replace(default_punch, wait=10.0)
            config = ClientConfig(initial_peers=(local.dht_address,), direct=punch)
            async with AsyncRemoteModel.open(model12, config) as model:
                result = await model.generate_detailed(PROMPT, NEW_TOKENS)
                relayed = sum(n.relay.statistics().bytes_relayed for n in nodes)
                again = await model.generate_detailed(PROMPT, NEW_TOKENS)
            assert result.ids == again.ids == reference
            paths = [(h["path"], h["upgraded"]) for h in result.route]
            assert paths == [("direct", False), ("direct", True)]
            assert hidden.server.hole_punch is not None
            assert hidden.server.hole_punch.upgraded == 2  # the first server's, the client's
            # the pings went through a relay; the generations did not add a byte there
            assert sum(n.relay.statistics().circuits_total for n in nodes) >= 2
            assert sum(n.relay.statistics().bytes_relayed for n in nodes) == relayed


async def test_a_punch_that_never_connects_falls_back_to_the_relay(
    model12: Path, reference: list[int]
) -> None:
    """The relayed server answers hole punches but no connection is ever made (as behind a
    NAT no SYN crosses): the client and the first server go on over the relay, the
    generation gives the reference tokens, and the punches end after DCUtR's 3 attempts
    each, with no new ones for the next generation (backoff)."""
    never = NeverPunches()
    punch = PunchConfig(window=0.5, wait=0.2)
    with trio.fail_after(120):
        async with open_local_swarm(model12) as local, AsyncExitStack() as stack:
            nodes = await relays(stack, local, 2)
            hidden = await local.add_server(
                LayerRange(6, 12), reachability=REACH, transport=Undialable(),
                wrap_handlers=never.wrap,
            )  # fmt: skip
            first = await local.add_server(
                LayerRange(0, 6), reachability=dataclasses.replace(REACH, direct=punch)
            )
            config = ClientConfig(initial_peers=(local.dht_address,), direct=punch)
            async with AsyncRemoteModel.open(model12, config) as model:
                result = await model.generate_detailed(PROMPT, NEW_TOKENS)
                assert first.server.announcer is not None
                pools = (model.pool, first.server.announcer.pool)
                with trio.fail_after(30):  # the punches end: 3 attempts each, both sides
                    while any(p.punch_failures(hidden.ready.peer_id) == 0 for p in pools):
                        await trio.sleep(0.05)
                calls = never.calls
                again = await model.generate_detailed(PROMPT, NEW_TOKENS)
                assert never.calls == calls  # both back off: not punched again
            assert result.ids == again.ids == reference
            assert [h["path"] for h in result.route] == ["direct", "relayed"]
            assert [h["path"] for h in again.route] == ["direct", "relayed"]
            assert calls == 6  # the client's three and the first server's three
            assert not first.server.announcer.pool.is_direct(hidden.ready.peer_id)
            assert sum(n.relay.statistics().circuits_total for n in nodes) >= 2


async def test_killing_the_relay_mid_generation(model12: Path, reference: list[int]) -> None:
    with trio.fail_after(180):
        async with open_local_swarm(model12) as local, AsyncExitStack() as stack:
            nodes = await relays(stack, local, 3)
            await local.add_server(LayerRange(0, 4), reachability=REACH)
            middle = await local.add_server(
                LayerRange(4, 8), reachability=REACH, transport=Undialable()
            )
            await local.add_server(LayerRange(8, 12), reachability=REACH)
            keeper = middle.server.reachability
            assert keeper is not None
            config = ClientConfig(initial_peers=(local.dht_address,), direct=None)
            async with AsyncRemoteModel.open(model12, config) as model:
                async with aclosing(model.stream(PROMPT, NEW_TOKENS)) as tokens:
                    got = []
                    while len(got) < 4:
                        event = await tokens.__anext__()
                        if isinstance(event, Token):
                            got.append(event.id)
                    used = tokens.result.route[1]
                    assert used["path"] == "relayed"
                    dead = next(n for n in nodes if n.port == used["port"])
                    await dead.kill()
                    killed_at = trio.current_time()
                    got += [token.id async for token in tokens if isinstance(token, Token)]
            assert got == reference
            with trio.fail_after(10):  # re-attached to two live relays
                while len(keeper.relays) < 2 or dead.peer_id in {
                    hop.peer_id for hop in keeper.relays
                }:
                    await trio.sleep(0.05)
            print(f"re-attached {trio.current_time() - killed_at:.2f} s after the relay died")
