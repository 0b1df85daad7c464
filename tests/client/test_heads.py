"""The head batcher: concurrent generations' logits in shared passes, as lone ones."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import torch
import trio

from swarm.client.heads import HeadBatcher
from swarm.shards import load_head
from swarm.testing.checkpoints import write_random_llama


async def test_concurrent_rows_share_passes_and_equal_their_lone_logits(tmp_path: Path) -> None:
    path = write_random_llama(tmp_path / "m", num_layers=1, hidden=64, vocab=3000)
    head = load_head(path)
    batcher = HeadBatcher(head)
    inputs = [
        torch.randn(1 + i % 3, 64, generator=torch.Generator().manual_seed(i)) for i in range(8)
    ]
    alone = [await batcher.logits(x) for x in inputs]  # no service: one call each
    assert batcher.statistics().calls == 8
    got: dict[int, list[torch.Tensor]] = {i: [] for i in range(8)}

    async def generation(i: int) -> None:
        for _ in range(5):
            got[i].append(await batcher.logits(inputs[i]))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(batcher.run)
            async with trio.open_nursery() as generations:
                for i in range(8):
                    generations.start_soon(generation, i)
            nursery.cancel_scope.cancel()
    stats = batcher.statistics()
    assert stats.requests == 8 + 40
    assert stats.calls - 8 < 40  # rows due together shared a pass
    for i in range(8):
        for logits in got[i]:
            # a matmul of many rows sums in another order than one of a single row (MKL),
            # so the last bits may differ; the tokens chosen from them do not
            torch.testing.assert_close(logits, alone[i], rtol=1e-5, atol=1e-5)
            assert torch.equal(logits.argmax(-1), alone[i].argmax(-1))


async def test_greedy_rows_take_the_screen_and_keep_the_float_token(tmp_path: Path) -> None:
    """Greedy and sampling requests in one service: greedy rows through the head's screen
    (each row's argmax the float head's on that row alone), the others the float logits."""
    path = write_random_llama(tmp_path / "m", num_layers=1, hidden=64, vocab=3000)
    head = load_head(path, screen=True)
    assert head.screen is not None
    batcher = HeadBatcher(head)
    inputs = [torch.randn(2, 64, generator=torch.Generator().manual_seed(i)) * 4 for i in range(6)]
    got: dict[int, torch.Tensor] = {}

    async def generation(i: int) -> None:
        got[i] = await batcher.logits(inputs[i], greedy=i % 2 == 0)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(batcher.run)
            async with trio.open_nursery() as generations:
                for i in range(6):
                    generations.start_soon(generation, i)
            nursery.cancel_scope.cancel()
    for i, x in enumerate(inputs):
        alone = torch.cat([head.logits(row[None, None])[0] for row in x])  # (2, vocab)
        assert torch.equal(got[i].argmax(-1), alone.argmax(-1))
        if i % 2:  # sampling rows: the float logits (batched: last bits may differ)
            torch.testing.assert_close(got[i], alone, rtol=1e-5, atol=1e-5)
        else:  # greedy rows: the candidates' float logits, -inf elsewhere
            kept = torch.isfinite(got[i])
            assert torch.equal(got[i][kept], alone[kept])
            assert int(kept.sum()) < 2 * 3000


async def test_a_lone_generations_short_passes_run_on_the_event_loop(tmp_path: Path) -> None:
    """One generation alone (`HeadBatcher.user`): after a first pass in the worker thread
    (which times it), its passes run on the event loop while they take at most
    ``inline_max``; with two generations, or ``inline_max=0``, every pass goes to the
    thread. The logits are the same either way."""
    path = write_random_llama(tmp_path / "m", num_layers=1, hidden=64, vocab=3000)
    head = load_head(path)
    loop = threading.get_ident()
    threads: list[bool] = []  # per pass: on the event loop
    real = head.logits

    def spy(hidden: torch.Tensor) -> torch.Tensor:
        threads.append(threading.get_ident() == loop)
        return real(hidden)

    head.logits = spy  # type: ignore[method-assign]
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(3))
    want = real(x[None])[0]

    async def passes(batcher: HeadBatcher, users: int, n: int) -> list[torch.Tensor]:
        with contextlib.ExitStack() as stack:
            for _ in range(users):
                stack.enter_context(batcher.user())
            return [await batcher.logits(x) for _ in range(n)]

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            lone = HeadBatcher(head, inline_max=0.5)
            await nursery.start(lone.run)
            for got in await passes(lone, 1, 4):
                assert torch.equal(got, want)
            assert threads == [False, True, True, True]
            assert lone.statistics().inlined == 3
            threads.clear()
            await passes(lone, 2, 3)
            assert threads == [False, False, False]
            threads.clear()
            never = HeadBatcher(head, inline_max=0.0)
            await nursery.start(never.run)
            await passes(never, 1, 3)
            assert threads == [False, False, False] and never.statistics().inlined == 0
            nursery.cancel_scope.cancel()
