"""`HopOpener`: how it plans routes (what the directory knows of each server) and how it
opens them (servers that fail to open are banned and the range planned again)."""

from __future__ import annotations

import random
from contextlib import AsyncExitStack
from types import SimpleNamespace

import pytest
import trio

from swarm.client.bans import BanList
from swarm.client.chain.failures import FailurePolicy
from swarm.client.chain.hop import HopFailure, HopState
from swarm.client.chain.opening import HopOpener
from swarm.client.config import ClientConfig, FailureConfig
from swarm.client.discovery import ServerDirectory, StaticDirectory
from swarm.client.routing import Hop
from swarm.directory import ServerView
from swarm.errors import SessionError, TransportError
from swarm.net.messages import PushTarget
from swarm.types import LayerRange, PeerId

from .test_routing import server, spans


def make_opener(
    directory: ServerDirectory, config: ClientConfig | None = None, cls: type = HopOpener
) -> HopOpener:
    config = config or ClientConfig()
    opener: HopOpener = cls(
        None,  # planning dials nobody; the openers that open below fake the dial
        directory,
        config,
        max_length=16,
        batch_size=1,
        failures=FailurePolicy(config, BanList(1.0, 2.0, 10.0)),
        rng=random.Random(0),
    )
    return opener


def test_the_opener_ranks_a_server_whose_ping_failed_far_lower() -> None:
    dead = server("dead", 0, 12, throughput=1000.0)
    live = server("live", 0, 12, throughput=10.0)

    class OneGone(StaticDirectory):
        def reached(self, view: ServerView) -> bool:
            return view.peer_id == live.peer_id

        def unreachable(self, view: ServerView) -> bool:
            return view.peer_id == dead.peer_id

    opener = make_opener(OneGone([dead, live]))

    async def picks() -> list[str]:
        return [spans(await opener.plan(LayerRange(0, 12)))[0][0] for _ in range(30)]

    assert set(trio.run(picks)) == {"live"}


def test_the_opener_ranks_servers_the_directory_has_not_reached_lower() -> None:
    proven, unproven = server("proven", 0, 12), server("unproven", 0, 12)

    class HalfProven(StaticDirectory):
        def reached(self, view: ServerView) -> bool:
            return view.peer_id != unproven.peer_id

    opener = make_opener(HalfProven([unproven, proven]))

    async def picks() -> list[str]:
        return [spans(await opener.plan(LayerRange(0, 12)))[0][0] for _ in range(30)]

    assert set(trio.run(picks)) == {"proven"}


class DialsFake(HopOpener):
    """Opens hops without a network: a server in ``gone`` fails as a vanished machine does
    (a transport error); every dial is recorded."""

    gone: set[PeerId]
    dialed: list[str]

    async def _open_hop(
        self,
        hop: Hop,
        session_id: bytes,
        push_to: PushTarget | None,
        push_from: PeerId | None,
        first_step: int,
    ) -> HopState:
        self.dialed.append(spans([hop])[0][0])
        await trio.sleep(0)
        if hop.server.peer_id in self.gone:
            raise HopFailure(hop, TransportError("no answer"))
        stream = SimpleNamespace(finished=True)  # nothing to end on close
        state = HopState(hop, session_id, stream, AsyncExitStack(), first_step)  # type: ignore[arg-type]
        state.push_to = push_to
        return state


@pytest.mark.parametrize("retries", [1, 2])
def test_every_server_that_failed_in_one_attempt_is_banned_and_counts_once(
    retries: int,
) -> None:
    # a third of a swarm left at once: the fastest route names three dead servers, which
    # fail together; all three are banned after that one attempt, and the second opens
    # (one re-plan per dead server would exceed the retries and fail the chain)
    dead = [server(f"dead{i}", 4 * i, 4 * i + 4, throughput=1000.0) for i in range(3)]
    live = [server(f"live{i}", 4 * i, 4 * i + 4, throughput=10.0) for i in range(3)]
    config = ClientConfig(failures=FailureConfig(max_open_retries=retries))
    opener = make_opener(StaticDirectory([*dead, *live]), config, DialsFake)
    assert isinstance(opener, DialsFake)
    opener.gone, opener.dialed = {s.peer_id for s in dead}, []

    async def open_all() -> tuple[list[str], set[PeerId]]:
        states = await opener.open_range(LayerRange(0, 12), 0, None, None)
        return [spans([s.hop])[0][0] for s in states], opener.bans.banned()

    opened, banned = trio.run(open_all)
    assert opened == ["live0", "live1", "live2"]
    assert sorted(opener.dialed) == sorted(["dead0", "dead1", "dead2", "live0", "live1", "live2"])
    assert banned == {s.peer_id for s in dead}
    assert len(opener.failures.failures) == 3


def test_an_opening_that_fails_more_attempts_than_the_retries_raises() -> None:
    # every server of 4:8 is dead: each attempt bans the one planned, until the retries end
    servers = [server("head", 0, 4), server("tail", 8, 12)]
    dead = [server(f"dead{i}", 4, 8, throughput=1000.0 - i) for i in range(4)]
    config = ClientConfig(failures=FailureConfig(max_open_retries=2))
    opener = make_opener(StaticDirectory([*servers, *dead]), config, DialsFake)
    assert isinstance(opener, DialsFake)
    opener.gone, opener.dialed = {s.peer_id for s in dead}, []

    async def open_all() -> None:
        await opener.open_range(LayerRange(0, 12), 0, None, None)

    with pytest.raises(SessionError, match="failed 3 times"):
        trio.run(open_all)
    tried = [name for name in opener.dialed if name.startswith("dead")]
    assert len(tried) == len(set(tried)) == 3  # one new server per attempt
