"""Every request gets an answer or a bounded refusal (issue 25, item 11): a forward of zero
tokens or zero rows is ``bad_request`` at once, many of them from many identities leave the
compute queue empty, a caller that leaves while its job waits takes the job with it, work
cannot wait in the queue forever, and a step sent again after it was answered is told so.
A real server on loopback, driven over raw RPC."""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import torch
import trio

from swarm.errors import ErrorCode, LimitExceeded, RemoteError
from swarm.identity import Identity
from swarm.net.messages import (
    ForwardRequest,
    ForwardResponse,
    InferenceInput,
    InferenceOpen,
    InferenceReady,
    InferenceStepResult,
)
from swarm.net.pool import open_connection_pool
from swarm.net.transport import TCPTransport
from swarm.server.compute import ComputeConfig, ComputeQueue, Priority
from swarm.testing.checkpoints import write_random_llama
from swarm.testing.swarm import LocalServer, open_local_swarm
from swarm.types import LayerRange

HIDDEN = 64
WHOLE = LayerRange(0, 2)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("degenerate") / "tiny"
    write_random_llama(path, num_layers=2, hidden=HIDDEN, seed=7, std=0.1)
    return path


@pytest.fixture
async def server(model_path: Path) -> AsyncIterator[LocalServer]:
    async with open_local_swarm(model_path) as local:
        yield await local.add_server(WHOLE, measure_throughput=False)


def _forward(rows: int, seq: int) -> ForwardRequest:
    hidden = torch.randn(rows, seq, HIDDEN)
    positions = torch.arange(seq, dtype=torch.int64).expand(rows, seq).contiguous()
    return ForwardRequest(hidden, positions, WHOLE)


@pytest.mark.parametrize("shape", [(1, 0), (0, 1), (0, 0)])
async def test_an_empty_forward_is_a_bad_request(
    server: LocalServer, shape: tuple[int, int]
) -> None:
    """The break: a zero-token forward was never answered (its job never left the queue)."""
    async with open_connection_pool(Identity.generate()) as pool:
        conn = await pool.get(server.ready.host, server.ready.port, server.ready.peer_id)
        with trio.fail_after(5), pytest.raises(RemoteError) as info:
            await conn.call("forward", _forward(*shape), ForwardResponse, timeout=4)
        assert info.value.code is ErrorCode.BAD_REQUEST
        reply = await conn.call("forward", _forward(1, 3), ForwardResponse, timeout=10)
        assert tuple(reply.hidden_states.shape) == (1, 3, HIDDEN)


async def test_many_degenerate_forwards_from_many_identities_leave_no_jobs(
    server: LocalServer,
) -> None:
    """The class: 4 identities on 2 addresses, 40 empty forwards each, all answered; the
    queue is empty afterwards and an honest forward is served."""
    handlers = server.server.handlers
    assert handlers is not None
    refused = 0
    with trio.fail_after(60):
        async with AsyncExitStack() as stack:
            conns = []
            for i in range(4):
                transport = TCPTransport(local_host=f"127.0.0.{2 + i % 2}")
                pool = await stack.enter_async_context(
                    open_connection_pool(Identity.generate(), transport=transport)
                )
                conns.append(
                    await pool.get(server.ready.host, server.ready.port, server.ready.peer_id)
                )

            async def flood(conn: object) -> None:
                nonlocal refused
                for n in range(40):
                    shape = ((1, 0), (0, 1), (0, 0), (0, 5))[n % 4]
                    try:
                        await conn.call("forward", _forward(*shape), ForwardResponse, timeout=5)  # type: ignore[attr-defined]
                    except RemoteError as exc:
                        assert exc.code is ErrorCode.BAD_REQUEST
                        refused += 1

            async with trio.open_nursery() as nursery:
                for conn in conns:
                    nursery.start_soon(flood, conn)
        assert refused == 160
        assert handlers.queue.statistics().queued == 0
        async with open_connection_pool(Identity.generate()) as pool:
            conn = await pool.get(server.ready.host, server.ready.port, server.ready.peer_id)
            await conn.call("forward", _forward(1, 4), ForwardResponse, timeout=10)


async def test_a_step_sent_again_after_its_answer_is_told_so(server: LocalServer) -> None:
    """A replayed step (the one just answered, on a session without a push source) gets an
    error answer instead of silence."""
    x, pos = torch.randn(1, 1, HIDDEN), torch.zeros(1, 1, dtype=torch.int64)
    async with AsyncExitStack() as stack, open_connection_pool(Identity.generate()) as pool:
        conn = await pool.get(server.ready.host, server.ready.port, server.ready.peer_id)
        stream = await stack.enter_async_context(conn.open_stream("inference", timeout=10))
        await stream.send(InferenceOpen(os.urandom(16), 16, 1, "float32", WHOLE))
        await stream.receive(InferenceReady)
        await stream.send(InferenceInput(0, x, pos))
        await stream.receive(InferenceStepResult)
        with trio.fail_after(3), pytest.raises(RemoteError) as info:
            await stream.send(InferenceInput(0, x, pos))
            await stream.receive(InferenceStepResult)
        assert info.value.code is ErrorCode.SESSION
        assert "step 0" in info.value.message


# ---- the compute queue on its own ----


async def test_a_caller_that_leaves_takes_its_job_out_of_the_queue() -> None:
    """A job whose caller is cancelled frees its place at once, even while the worker is
    busy (the break: cancelled jobs counted against the queue until the worker woke)."""
    queue = ComputeQueue(ComputeConfig(max_queued=4))
    gate = threading.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(queue.run)
        nursery.start_soon(queue.submit, lambda: gate.wait(5), Priority.FORWARD)
        await trio.sleep(0.05)  # the worker is busy
        for _ in range(3):
            with trio.move_on_after(0.02):
                await queue.submit(lambda: None, Priority.FORWARD)
        assert queue.statistics().queued == 0
        gate.set()
        assert await queue.submit(lambda: "after", Priority.INFERENCE) == "after"
        nursery.cancel_scope.cancel()


async def test_work_cannot_wait_in_the_queue_forever() -> None:
    """Past ``max_wait`` a waiting job is refused with `LimitExceeded` and leaves."""
    queue = ComputeQueue(ComputeConfig(max_wait=0.2))
    gate = threading.Event()

    async def blocker() -> None:  # its caller gives up too (the thread runs on)
        with pytest.raises(LimitExceeded):
            await queue.submit(lambda: gate.wait(5), Priority.FORWARD)

    async with trio.open_nursery() as nursery:
        await nursery.start(queue.run)
        nursery.start_soon(blocker)
        await trio.sleep(0.05)
        with trio.fail_after(3), pytest.raises(LimitExceeded, match="waited"):
            await queue.submit(lambda: None, Priority.INFERENCE)
        assert queue.statistics().queued == 0
        gate.set()
        nursery.cancel_scope.cancel()
