"""Servers among strangers: per-peer and per-address quotas, bad step numbers refused at once.
Real servers on loopback, driven over raw RPC. (Idle sessions reaped on a timer:
`tests/server/test_reaper.py`, under a virtual clock.)"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import torch
import trio
from trio.testing import wait_all_tasks_blocked

from swarm.errors import ErrorCode, LimitExceeded, RemoteError
from swarm.identity import Identity
from swarm.net.messages import InferenceInput, InferenceOpen, InferenceReady, InferenceStepResult
from swarm.net.pool import ConnectionPool, open_connection_pool
from swarm.net.rpc import RpcStream
from swarm.net.transport import TCPTransport
from swarm.server.sessions import SessionLimits
from swarm.testing.checkpoints import write_random_llama
from swarm.testing.swarm import LocalServer, open_local_swarm
from swarm.types import LayerRange

HIDDEN = 64
WHOLE = LayerRange(0, 2)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("quotas") / "tiny"
    write_random_llama(path, num_layers=2, hidden=HIDDEN, seed=7, std=0.1)
    return path


LIMITS = SessionLimits(
    max_sessions=8,
    max_sessions_per_peer=3,
    max_sessions_per_host=6,
    max_length=64,
    cache_tokens=8 * 64,
    peer_cache_share=0.5,
    host_cache_share=0.75,
)


@pytest.fixture
async def server(model_path: Path) -> AsyncIterator[LocalServer]:
    async with open_local_swarm(model_path) as local:
        yield await local.add_server(WHOLE, limits=LIMITS, measure_throughput=False)


async def _open(
    stack: AsyncExitStack,
    pool: ConnectionPool,
    server: LocalServer,
    length: int = 16,
    batch: int = 1,
) -> RpcStream:
    """One session on ``server``; raises what the server answers (LimitExceeded...)."""
    conn = await pool.get(server.ready.host, server.ready.port, server.ready.peer_id)
    inner = AsyncExitStack()
    stream = await inner.enter_async_context(conn.open_stream("inference", timeout=10))
    try:
        await stream.send(InferenceOpen(os.urandom(16), length, batch, "float32", WHOLE))
        await stream.receive(InferenceReady)
    except BaseException:
        await inner.aclose()
        raise
    stack.push_async_exit(inner)
    return stream


async def _open_until_refused(
    stack: AsyncExitStack, pool: ConnectionPool, server: LocalServer, tries: int
) -> int:
    for opened in range(tries):
        try:
            await _open(stack, pool, server)
        except LimitExceeded:
            return opened
    return tries


async def _reclaimed(streams: list[RpcStream], server: LocalServer, since: int) -> int:
    """How many of ``streams`` the server ended with "reclaimed"; those are removed from the
    list. Waits (deadline 30 s) until as many were told as the server has reclaimed since
    its count was ``since``, rather than a fixed time per stream, so a loaded machine
    cannot hide a message that is merely late."""
    handlers = server.server.handlers
    assert handlers is not None
    target = handlers.sessions.reclaimed - since
    ended: list[RpcStream] = []
    told = trio.Event()

    async def watch(stream: RpcStream) -> None:
        try:
            await stream.receive(InferenceStepResult)
        except RemoteError as exc:
            assert exc.code is ErrorCode.SESSION and "reclaimed" in exc.message
            ended.append(stream)
            if len(ended) >= target:
                told.set()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for stream in streams:
                nursery.start_soon(watch, stream)
            if target > 0:
                await told.wait()
            await wait_all_tasks_blocked()  # and nothing else on its way
            nursery.cancel_scope.cancel()
    for stream in ended:
        streams.remove(stream)
    return len(ended)


async def test_one_peer_cannot_take_every_session(server: LocalServer) -> None:
    """A peer may borrow an idle server's room beyond its share (3 here), but others take
    it back when they need it; a peer beyond its share cannot take anyone's."""
    handlers = server.server.handlers
    assert handlers is not None
    elsewhere = TCPTransport(local_host="127.0.0.2")  # the hog's own address
    with trio.fail_after(30):
        async with (
            AsyncExitStack() as stack,
            open_connection_pool(Identity.generate(), transport=elsewhere) as hog,
            open_connection_pool(Identity.generate()) as other,
            open_connection_pool(Identity.generate()) as third,
        ):
            hogged = [await _open(stack, hog, server) for _ in range(8)]  # the whole server
            with pytest.raises(LimitExceeded, match="server is full"):
                await _open(stack, hog, server)  # beyond its share: takes nobody's room
            for _ in range(3):
                await _open(stack, other, server)  # within its share: room is taken back
            assert await _reclaimed(hogged, server, since=0) == 3
            assert len(handlers.sessions) == 8
            for _ in range(2):  # 5 of the hog's are left, 2 of them beyond its share of 3
                await _open(stack, third, server)
            assert await _reclaimed(hogged, server, since=3) == 2
            with pytest.raises(LimitExceeded):  # everyone within its share: nobody gives way
                await _open(stack, third, server)
            assert handlers.sessions.reclaimed == 5


async def test_identities_from_one_address_leave_room_for_others(server: LocalServer) -> None:
    sybil = TCPTransport(local_host="127.0.0.2")
    with trio.fail_after(60):
        async with AsyncExitStack() as stack:
            held = 0
            for _ in range(6):  # fresh identities, all from 127.0.0.2
                pool = await stack.enter_async_context(
                    open_connection_pool(Identity.generate(), transport=sybil)
                )
                held += await _open_until_refused(stack, pool, server, 3)
            assert held == 8  # borrowed: the per-address share is 6
            other = await stack.enter_async_context(open_connection_pool(Identity.generate()))
            for _ in range(2):  # peers at another address still get theirs
                await _open(stack, other, server)
            more = await stack.enter_async_context(
                open_connection_pool(Identity.generate(), transport=sybil)
            )
            with pytest.raises(LimitExceeded):  # a fresh identity at the full address: no
                await _open(stack, more, server)


async def test_one_session_cannot_take_the_whole_cache(server: LocalServer) -> None:
    with trio.fail_after(30):
        async with AsyncExitStack() as stack, open_connection_pool(Identity.generate()) as pool:
            with pytest.raises(LimitExceeded, match="per peer"):
                await _open(stack, pool, server, length=64, batch=5)  # 320 of 512 tokens
            await _open(stack, pool, server, length=64)


@pytest.mark.parametrize("case", ["ahead", "replayed"])
async def test_bad_step_numbers_are_refused_at_once(server: LocalServer, case: str) -> None:
    x, pos = torch.randn(1, 1, HIDDEN), torch.zeros(1, 1, dtype=torch.int64)
    async with AsyncExitStack() as stack, open_connection_pool(Identity.generate()) as pool:
        stream = await _open(stack, pool, server)
        if case == "replayed":
            for step in range(3):
                await stream.send(InferenceInput(step, x, pos + step))
                await stream.receive(InferenceStepResult)
        bad = 7 if case == "ahead" else 0
        with trio.fail_after(1.5), pytest.raises(RemoteError) as info:
            await stream.send(InferenceInput(bad, x, pos))
            await stream.receive(InferenceStepResult)
        assert info.value.code is ErrorCode.SESSION
        assert f"step {bad}" in info.value.message
