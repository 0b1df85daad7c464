"""Many users on real servers: concurrent generations batched, long forwards chunked or
refused while sessions decode, a full queue answered with `LimitExceeded`, and
``--layers auto`` sized from (faked) free memory."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
import trio

from swarm.client.config import ClientConfig
from swarm.client.model import AsyncRemoteModel
from swarm.errors import LimitExceeded
from swarm.identity import Identity
from swarm.net.messages import (
    ForwardRequest,
    ForwardResponse,
    InferenceInput,
    InferenceOpen,
    InferenceReady,
    InferenceStepResult,
)
from swarm.net.pool import ConnectionPool, open_connection_pool
from swarm.server import capacity
from swarm.server.compute import ComputeConfig
from swarm.server.handlers import ServingHandlers
from swarm.server.sessions import SessionLimits
from swarm.shards import ModelConfig, load_span
from swarm.testing.checkpoints import write_random_llama
from swarm.testing.swarm import LocalServer, open_local_swarm
from swarm.types import LayerRange

HIDDEN = 64
WHOLE = LayerRange(0, 6)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("concurrency") / "tiny"
    write_random_llama(path, num_layers=6, hidden=HIDDEN, seed=7, std=0.1)
    return path


@pytest.fixture
async def pool() -> AsyncIterator[ConnectionPool]:
    async with open_connection_pool(Identity.generate()) as p:
        yield p


def _handlers(server: LocalServer) -> ServingHandlers:
    handlers = server.server.handlers
    assert handlers is not None
    return handlers


async def test_eight_concurrent_generations_equal_alone(model_path: Path) -> None:
    """8 greedy generations at once through a 2-server swarm: each gives the tokens it
    gives alone, and their steps really ran batched on both servers."""
    prompts = [[(7 * i + j) % 250 + 1 for j in range(3 + i)] for i in range(8)]
    async with open_local_swarm(model_path, [LayerRange(0, 3), LayerRange(3, 6)]) as local:
        config = ClientConfig(initial_peers=(local.dht_address,))
        async with AsyncRemoteModel.open(model_path, config) as model:
            alone = [await model.generate(p, 12) for p in prompts]
            together: dict[int, object] = {}

            async def one(i: int) -> None:
                together[i] = await model.generate(prompts[i], 12)

            with trio.fail_after(300):
                async with trio.open_nursery() as nursery:
                    for i in range(8):
                        nursery.start_soon(one, i)
        assert [together[i] for i in range(8)] == alone
        for server in local.servers:  # one step at a time before batching: never above 1
            recent = _handlers(server).queue.statistics().recent
            assert max(r.decode_steps for r in recent) >= 2  # several sessions per forward


async def _decode_while(
    pool: ConnectionPool,
    server: LocalServer,
    decoding: trio.Event,
    busy: trio.Event,
    done: trio.Event,
) -> list[int]:
    """A session stepping one token at a time until ``done`` (``decoding`` is set after its
    third step); for each step that began after ``busy`` was set, how many batches carrying
    a chunk of bulk work ran while it waited."""
    conn = await pool.get(server.ready.host, server.ready.port, server.ready.peer_id)
    queue = _handlers(server).queue
    waited: list[int] = []
    async with conn.open_stream("inference", timeout=60) as stream:
        await stream.send(InferenceOpen(os.urandom(16), 4096, 1, "float32", WHOLE))
        await stream.receive(InferenceReady)
        x = torch.randn(1, 1, HIDDEN)
        for step in range(4096):
            if done.is_set():
                break
            if step == 3:
                decoding.set()
            counted, before = busy.is_set(), queue.statistics().batches
            await stream.send(InferenceInput(step, x, torch.tensor([[step]])))
            await stream.receive(InferenceStepResult)
            if counted and not done.is_set():
                ran = queue.statistics().batches - before
                waited.append(sum(1 for r in queue.statistics().recent[-ran:] if r.bulk_tokens))
        await stream.send_end()
    return waited


async def test_long_forwards_while_a_session_decodes(
    model_path: Path, pool: ConnectionPool
) -> None:
    """A 4,096-token forward is chunked between a session's steps (its steps keep coming:
    each waits for two chunks at most, the one running when it arrived and the one in its
    own batch, and the answer equals one pass); a 32,768-token forward is chunked the same
    way or refused up front, and the session lives on. Counted in batches, not seconds, so
    other work on the machine does not move the verdict."""
    limits = SessionLimits(cache_tokens=200_000, peer_cache_share=1.0, host_cache_share=1.0)
    async with open_local_swarm(model_path) as local:
        # a chunk of its own, not measured: a busy machine measured 16 tokens, and the 256
        # chunks of 4,096 tokens then overflowed the 256 batch records the queue keeps
        compute = ComputeConfig(prefill_chunk=128)
        server = await local.add_server(WHOLE, limits=limits, compute=compute)
        queue = _handlers(server).queue
        # a first estimate refuses nothing: wait for the measured timings, so that a forward
        # the server cannot finish in time is refused rather than run (a full run beside a
        # CPU burner ran the 32,768 tokens under the first estimate, past 60 s)
        with trio.fail_after(120):
            while not _handlers(server).state.timings_final:
                await trio.sleep(0.1)
        conn = await pool.get(server.ready.host, server.ready.port, server.ready.peer_id)
        span = load_span(model_path, WHOLE)
        for tokens in (4096, 32768):
            decoding, busy, done = trio.Event(), trio.Event(), trio.Event()
            result: dict[str, object] = {}
            hidden = torch.randn(1, tokens, HIDDEN)
            before = queue.statistics().batches

            async def forward(
                hidden: torch.Tensor = hidden,
                decoding: trio.Event = decoding,
                busy: trio.Event = busy,
                done: trio.Event = done,
                result: dict[str, object] = result,
            ) -> None:
                await decoding.wait()
                busy.set()
                request = ForwardRequest(hidden, torch.arange(hidden.shape[1]).view(1, -1), WHOLE)
                try:
                    # the server's own refusal rule leaves a factor 2 against its measured
                    # speed; a machine loaded after that measurement may be slower still
                    call = conn.call("forward", request, ForwardResponse, timeout=240)
                    result["out"] = await call
                except LimitExceeded as exc:
                    result["refused"] = exc
                done.set()

            with trio.fail_after(300):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(forward)
                    waited = await _decode_while(pool, server, decoding, busy, done)
            batches = queue.statistics().recent[-(queue.statistics().batches - before) :]
            chunks = [r for r in batches if r.bulk_tokens]
            if "refused" in result:
                assert tokens == 32768 and not chunks  # refused before any work
                assert "would take about" in str(result["refused"])
                continue
            # every chunk ran in a batch of its own turn (the queue keeps the last 256 batch
            # records, so a 32,768-token forward's are counted from the total)
            ran = queue.statistics().batches - before
            assert ran >= tokens // queue.prefill_chunk
            assert len(chunks) >= min(tokens // queue.prefill_chunk, len(batches)) - len(waited)
            assert max(r.bulk_tokens for r in chunks) <= queue.prefill_chunk
            # the session stepped along: each step waits two chunks at most, so at least half as
            # many steps as chunks, less the partial ones at either end
            assert len(waited) >= len(chunks) // 2 - 1, (len(waited), len(chunks))
            assert max(waited) <= 2, waited  # never behind the whole forward
            if tokens == 4096:
                with torch.no_grad():
                    want = span(hidden, torch.arange(tokens).view(1, -1))
                out = result["out"]
                assert isinstance(out, ForwardResponse)
                torch.testing.assert_close(out.hidden_states, want, rtol=1e-3, atol=1e-4)
        sessions = _handlers(server).sessions
        with trio.fail_after(10):
            while len(sessions):  # the last session closes as its stream ends
                await trio.sleep(0.01)
        assert sessions.free_tokens == limits.cache_tokens  # temporary caches released too


async def test_full_queue_is_limit_exceeded(model_path: Path, pool: ConnectionPool) -> None:
    async with open_local_swarm(model_path) as local:
        compute = ComputeConfig(max_queued=3)
        server = await local.add_server(WHOLE, compute=compute, measure_throughput=False)
        conn = await pool.get(server.ready.host, server.ready.port, server.ready.peer_id)
        outcomes: list[str] = []

        async def forward() -> None:
            request = ForwardRequest(
                torch.randn(1, 600, HIDDEN), torch.arange(600).view(1, -1), WHOLE
            )
            try:
                await conn.call("forward", request, ForwardResponse, timeout=60)
                outcomes.append("done")
            except LimitExceeded as exc:
                assert "queue is full" in str(exc)
                outcomes.append("refused")

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(forward)
        assert "refused" in outcomes and "done" in outcomes
        assert outcomes.count("done") >= 3
        # and the server serves on
        request = ForwardRequest(torch.randn(1, 4, HIDDEN), torch.arange(4).view(1, -1), WHOLE)
        reply = await conn.call("forward", request, ForwardResponse)
        assert reply.hidden_states.shape == (1, 4, HIDDEN)


@pytest.mark.parametrize("k", [2, 4])
async def test_layers_auto_serves_what_free_memory_holds(
    model_path: Path, k: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = ModelConfig.from_pretrained(model_path)
    block = capacity.block_bytes(config, torch.float32)
    per_token = capacity.kv_bytes_per_token(config, torch.float32)
    cache_tokens = 4096
    plan = capacity.MemoryPlan()
    one = block + cache_tokens * per_token  # a block and its share of the cache
    free = int((k + 0.5) * one / plan.usable_fraction)  # room for k blocks, not k + 1
    monkeypatch.setattr(capacity, "available_memory", lambda device: free)
    async with open_local_swarm(model_path) as local:
        limits = SessionLimits(cache_tokens=cache_tokens)
        server = await local.add_server(None, limits=limits, measure_throughput=False)
        assert len(server.ready.layers) == k
        # the cache budget derived from memory too: what is left after the k blocks
        derived = await local.add_server(
            None, num_blocks=k, cache_tokens_from_memory=True, measure_throughput=False
        )
        tokens = _handlers(derived).sessions.limits.cache_tokens
        assert (k + 0.5) * one - k * block - 2 * per_token * k <= tokens * per_token * k
        assert tokens * per_token * k <= (k + 0.5) * one - k * block
