"""Concurrent generations on one model each get their own answer (no shared "last result").

Regression: `AsyncRemoteModel.stream` stored each generation's result in a model-wide
attribute that `generate_detailed` returned, so concurrent callers got whichever generation
started last. Behind a gateway that hands one user's answer to another.
"""

from __future__ import annotations

import threading
from pathlib import Path

import trio

from swarm.client.config import ClientConfig
from swarm.client.model import AsyncRemoteModel, GenerationResult, Token
from swarm.client.remote import RemoteModel

from .fake_server import FakeServer, run_servers
from .pipeline import make_servers
from .test_model import _directory, _greedy_reference, checkpoint, served  # noqa: F401

PROMPTS = [[5, 17, 300, 42], [9, 8, 7], [100, 200, 300, 400, 500], [33]]
NEW = [6, 3, 5, 4]


async def test_concurrent_tasks_each_get_their_own_result(checkpoint: Path) -> None:  # noqa: F811
    want = [_greedy_reference(checkpoint, p, n) for p, n in zip(PROMPTS, NEW, strict=True)]
    servers = make_servers(checkpoint, [(0, 3), (3, 6)])
    got: dict[int, GenerationResult] = {}
    streamed: dict[int, list[int]] = {}
    async with run_servers(servers):
        async with AsyncRemoteModel.open(
            checkpoint, ClientConfig(), directory=_directory(servers)
        ) as model:

            async def detailed(i: int) -> None:
                got[i] = await model.generate_detailed(PROMPTS[i], NEW[i])

            async def stream(i: int) -> None:
                ids = []
                async with model.stream(PROMPTS[i], NEW[i]) as tokens:
                    async for token in tokens:
                        if isinstance(token, Token):
                            ids.append(token.id)
                        await trio.sleep(0)
                assert tokens.result.ids == ids
                streamed[i] = ids

            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    for i in range(len(PROMPTS)):
                        nursery.start_soon(detailed, i)
                        nursery.start_soon(stream, i)
    for i, ids in enumerate(want):
        assert got[i].ids == ids, f"generation {i} got another generation's answer"
        assert len(got[i].timings) == len(ids)
        assert streamed[i] == ids


def test_concurrent_threads_each_get_their_own_result(
    checkpoint: Path,  # noqa: F811
    served: list[FakeServer],  # noqa: F811
) -> None:
    want = [_greedy_reference(checkpoint, p, n) for p, n in zip(PROMPTS, NEW, strict=True)]
    got: dict[int, object] = {}
    details: dict[int, GenerationResult] = {}
    with RemoteModel(checkpoint, ClientConfig(), directory=_directory(served)) as model:

        def run(i: int) -> None:
            got[i] = model.generate(PROMPTS[i], NEW[i])
            details[i] = model.generate_detailed(PROMPTS[i], NEW[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
    for i, ids in enumerate(want):
        assert got[i] == ids, f"thread {i} got another generation's answer"
        assert details[i].ids == ids
