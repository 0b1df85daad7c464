"""The compute queue batches sessions' steps, chunks prompts between them, and is fair.

Driven straight through `ComputeQueue.run_span` on a real (small) span, without RPC, so
that counts of what ran in which batch are exact. The tests of the queue's timers (the
gather window, the report) run the batches in the event loop (`_inline`) under trio's
`autojump_clock`, where each batch costs `BATCH_SECONDS` of virtual time: no real time
passes and no machine load moves their outcome. Fairness is judged by which client got
which batch slots, never by seconds (the latency ratios are `benchmarks/flood.py --check`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import pytest
import torch
import trio
import trio.testing
from trio.testing import wait_all_tasks_blocked

from swarm.errors import LimitExceeded
from swarm.server.compute import CLIENT, ComputeConfig, ComputeQueue, Priority, Requester
from swarm.shards import KVCache, load_span
from swarm.shards.span import Span
from swarm.testing.checkpoints import write_random_llama
from swarm.types import LayerRange

HIDDEN = 256
T = TypeVar("T")


@pytest.fixture(scope="module")
def span(tmp_path_factory: pytest.TempPathFactory) -> Span:
    path: Path = tmp_path_factory.mktemp("batching") / "model"
    write_random_llama(
        path, num_layers=4, hidden=HIDDEN, heads=8, kv_heads=4, intermediate=1024, seed=1
    )
    torch.set_num_threads(1)
    return load_span(path, LayerRange(0, 4))


BATCH_SECONDS = 0.01
"""What a batch costs on trio's virtual clock when it runs `_inline`."""


async def _inline(fn: Callable[..., T], *args: object) -> T:
    """`ComputeQueue`'s ``run_sync`` for virtual time: run in the event loop, then let
    `BATCH_SECONDS` pass (other tasks arrive meanwhile, as they would beside a thread)."""
    result = fn(*args)
    await trio.sleep(BATCH_SECONDS)
    return result


@pytest.fixture
async def queue_factory() -> AsyncIterator[object]:
    """``make(config, inline=False)``: a running queue; ``inline`` runs its batches in the
    event loop (for tests under ``autojump_clock``) instead of on a worker thread."""
    async with trio.open_nursery() as nursery:

        async def make(config: ComputeConfig | None = None, inline: bool = False) -> ComputeQueue:
            queue = ComputeQueue(config, run_sync=_inline) if inline else ComputeQueue(config)
            await nursery.start(queue.run)
            return queue

        yield make
        nursery.cancel_scope.cancel()


def _cache(span: Span, length: int = 1200) -> KVCache:
    return KVCache.allocate(span.config, span.layers, 1, length)


def _pos(start: int, seq: int) -> torch.Tensor:
    return torch.arange(start, start + seq).view(1, seq)  # (1, seq)


async def test_batched_sessions_equal_alone(span: Span, queue_factory: object) -> None:
    """Three sessions decode while a fourth prefills a 300-token prompt in chunks and a
    stateless forward waits: every output equals running that session alone, and they
    really ran together (a batch held decode steps and a prompt chunk)."""
    queue: ComputeQueue = await queue_factory(ComputeConfig(prefill_chunk=64))  # type: ignore[operator]
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randn(1, n, HIDDEN, generator=gen) for n in (4, 9, 15)]
    caches, alone = [_cache(span) for _ in prompts], [_cache(span) for _ in prompts]
    with torch.no_grad():
        for p, c, a in zip(prompts, caches, alone, strict=True):
            span(p, _pos(0, p.shape[1]), c)
            span(p, _pos(0, p.shape[1]), a)
    steps = [torch.randn(1, 1, HIDDEN, generator=gen) for _ in prompts]
    long_prompt = torch.randn(1, 300, HIDDEN, generator=gen)
    forward = torch.randn(1, 20, HIDDEN, generator=gen)
    results: dict[str, torch.Tensor] = {}

    async def run(
        name: str,
        x: torch.Tensor,
        pos: torch.Tensor,
        cache: KVCache | None,
        priority: Priority = Priority.INFERENCE,
    ) -> None:
        CLIENT.set(Requester(name))
        results[name] = await queue.run_span(span, x, pos, cache, priority)

    prefill_cache = _cache(span)
    async with trio.open_nursery() as nursery:
        for i, (x, p) in enumerate(zip(steps, prompts, strict=True)):
            nursery.start_soon(run, f"decode{i}", x, _pos(p.shape[1], 1), caches[i])
        nursery.start_soon(run, "prefill", long_prompt, _pos(0, 300), prefill_cache)
        nursery.start_soon(run, "forward", forward, _pos(0, 20), None, Priority.FORWARD)
    with torch.no_grad():
        for i, (x, p) in enumerate(zip(steps, prompts, strict=True)):
            want = span(x, _pos(p.shape[1], 1), alone[i])
            torch.testing.assert_close(results[f"decode{i}"], want, rtol=1e-4, atol=1e-5)
        want = span(long_prompt, _pos(0, 300))
        torch.testing.assert_close(results["prefill"], want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(results["forward"], span(forward, _pos(0, 20)))
    assert prefill_cache.length == 300
    recent = queue.statistics().recent
    assert recent[0].decode_steps == 3 and recent[0].bulk_tokens == 64
    assert sum(r.bulk_tokens for r in recent) == 320  # 300 prompt + 20 forward, in chunks
    assert max(r.bulk_tokens for r in recent) <= 64


async def test_short_lone_decode_steps_run_on_the_event_loop(
    span: Span, queue_factory: object
) -> None:
    """A batch of one decode step runs on the event loop (no hand-off to the worker thread
    and back) once such a step was timed and as long as the last one took at most
    ``inline_max``; a slower one sends the next to the thread, batches of several steps
    and prompts always go there, ``inline_max=0`` never inlines; outputs equal alone.
    (A step "slower than inline_max" is made by lowering the queue's ``inline_max`` for
    one step, not by sleeping: no wall-clock time decides anything here.)"""
    loop = threading.get_ident()
    ran: list[tuple[str, bool]] = []  # (what, on the event loop)
    forward, forward_batch = span.forward, span.forward_batch

    def timed_forward(*args: object, **kwargs: object) -> torch.Tensor:
        ran.append(("one", threading.get_ident() == loop))
        return forward(*args, **kwargs)  # type: ignore[arg-type]

    def timed_batch(*args: object, **kwargs: object) -> list[torch.Tensor]:
        ran.append(("batch", threading.get_ident() == loop))
        return forward_batch(*args, **kwargs)  # type: ignore[arg-type]

    span.forward, span.forward_batch = timed_forward, timed_batch  # type: ignore[method-assign]
    try:
        config = ComputeConfig(inline_max=0.25)
        queue: ComputeQueue = await queue_factory(config)  # type: ignore[operator]
        gen = torch.Generator().manual_seed(5)
        prompt = torch.randn(1, 6, HIDDEN, generator=gen)
        cache, alone = _cache(span), _cache(span)
        with torch.no_grad():
            forward(prompt, _pos(0, 6), alone)
        await queue.run_span(span, prompt, _pos(0, 6), cache, Priority.INFERENCE)
        outs = []
        for i, most in enumerate((0.25, 0.25, 0.25, 1e-9, 0.25, 0.25)):
            queue.config = replace(config, inline_max=most)
            x = torch.randn(1, 1, HIDDEN, generator=gen)
            out = await queue.run_span(span, x, _pos(6 + i, 1), cache, Priority.INFERENCE)
            with torch.no_grad():
                outs.append((out, forward(x, _pos(6 + i, 1), alone)))
        # the prompt and the first step (untimed) on the thread; then on the loop, but for
        # the step after which the last one counted as too slow
        assert [on_loop for _, on_loop in ran] == [False, False, True, True, False, True, True]
        assert queue.inlined == 4
        for got, want in outs:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        ran.clear()
        second, second_alone = _cache(span), _cache(span)
        with torch.no_grad():
            forward(prompt, _pos(0, 6), second_alone)
        await queue.run_span(span, prompt, _pos(0, 6), second, Priority.INFERENCE)
        xs = [torch.randn(1, 1, HIDDEN, generator=gen) for _ in range(2)]
        got: dict[int, torch.Tensor] = {}

        async def step(i: int, c: KVCache, at: int) -> None:
            got[i] = await queue.run_span(span, xs[i], _pos(at, 1), c, Priority.INFERENCE)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(step, 0, cache, 12)
            nursery.start_soon(step, 1, second, 6)
        assert ("batch", False) in ran and ("batch", True) not in ran
        with torch.no_grad():
            torch.testing.assert_close(
                got[0], forward(xs[0], _pos(12, 1), alone), rtol=1e-4, atol=1e-5
            )
            torch.testing.assert_close(
                got[1], forward(xs[1], _pos(6, 1), second_alone), rtol=1e-4, atol=1e-5
            )
        ran.clear()
        never: ComputeQueue = await queue_factory(ComputeConfig(inline_max=0))  # type: ignore[operator]
        third = _cache(span)
        await never.run_span(span, prompt, _pos(0, 6), third, Priority.INFERENCE)
        for i in range(3):
            x = torch.randn(1, 1, HIDDEN, generator=gen)
            await never.run_span(span, x, _pos(6 + i, 1), third, Priority.INFERENCE)
        assert ran and not any(on_loop for _, on_loop in ran) and never.inlined == 0
    finally:
        del span.forward, span.forward_batch


async def test_a_lone_short_step_runs_in_the_task_that_submitted_it(
    span: Span, queue_factory: object
) -> None:
    """A short decode step that the worker would run alone on the event loop runs in its
    caller's task (the worker is neither woken for it nor wakes the caller), and counts
    in the statistics as the worker's batches do; steps submitted together still go to
    the worker as one batch."""
    tasks: list[str] = []
    forward = span.forward

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        on_loop = threading.get_ident() == loop
        tasks.append(trio.lowlevel.current_task().name if on_loop else "thread")
        return forward(*args, **kwargs)  # type: ignore[arg-type]

    loop = threading.get_ident()
    span.forward = spy  # type: ignore[method-assign]
    try:
        queue: ComputeQueue = await queue_factory(ComputeConfig(inline_max=0.25))  # type: ignore[operator]
        cache, alone = _cache(span), _cache(span)
        prompt = torch.randn(1, 6, HIDDEN, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            forward(prompt, _pos(0, 6), alone)
        await queue.run_span(span, prompt, _pos(0, 6), cache, Priority.INFERENCE)
        for i in range(3):
            x = torch.randn(1, 1, HIDDEN, generator=torch.Generator().manual_seed(i))
            out = await queue.run_span(span, x, _pos(6 + i, 1), cache, Priority.INFERENCE)
            with torch.no_grad():
                torch.testing.assert_close(out, forward(x, _pos(6 + i, 1), alone))
    finally:
        del span.forward
    me = trio.lowlevel.current_task().name
    assert tasks == ["thread", "thread", me, me]  # the prompt, the untimed first step
    assert queue.inlined == 2
    stats = queue.statistics()
    assert stats.batches == 4 and stats.queued == 0
    assert [r.decode_steps for r in stats.recent] == [0, 1, 1, 1]


async def test_a_lone_sessions_step_takes_no_scheduling_round(
    span: Span, queue_factory: object
) -> None:
    """While no other session ran work here, a short lone step runs at once in its caller's
    task, which does not yield to the scheduler (a scheduling round less per step); once
    another session has, its caller checkpoints first, so that steps arriving in the same
    round are batched (`test_short_lone_decode_steps_run_on_the_event_loop`)."""

    class Yields(trio.abc.Instrument):
        """How often ``task`` gave the scheduler back control."""

        def __init__(self, task: trio.lowlevel.Task) -> None:
            self.task, self.count = task, 0

        def after_task_step(self, task: trio.lowlevel.Task) -> None:
            self.count += task is self.task

    async def step_yields(x: torch.Tensor, at: int) -> int:
        yields = Yields(trio.lowlevel.current_task())
        trio.lowlevel.add_instrument(yields)
        try:
            await queue.run_span(span, x, _pos(at, 1), cache, Priority.INFERENCE)
        finally:
            trio.lowlevel.remove_instrument(yields)
        return yields.count

    queue: ComputeQueue = await queue_factory(ComputeConfig(inline_max=0.25))  # type: ignore[operator]
    gen = torch.Generator().manual_seed(4)
    prompt = torch.randn(1, 6, HIDDEN, generator=gen)
    xs = torch.randn(3, 1, 1, HIDDEN, generator=gen)  # three steps of one token
    cache = _cache(span)
    await queue.run_span(span, prompt, _pos(0, 6), cache, Priority.INFERENCE)
    await queue.run_span(span, xs[0], _pos(6, 1), cache, Priority.INFERENCE)  # untimed: thread
    assert await step_yields(xs[1], 7) == 0 and queue.inlined == 1
    second = _cache(span)  # another session's (alive while it is open)
    await queue.run_span(span, prompt, _pos(0, 6), second, Priority.INFERENCE)
    assert await step_yields(xs[2], 8) == 1 and queue.inlined == 2


async def test_a_long_prompt_is_chunked_between_decode_steps(
    span: Span, queue_factory: object, autojump_clock: trio.testing.MockClock
) -> None:
    """A 1,000-token prompt arriving while 4 sessions decode is chunked between their
    steps: every batch while it prefills holds all four decoders' steps and at most one
    chunk of `prefill_chunk` tokens, so a decode step waits for one chunk at most, never
    for the whole prompt (unchunked, the prompt stalls them for its whole pass). How many
    seconds that is on a given machine: `benchmarks/fairness.py --check`."""
    queue: ComputeQueue = await queue_factory(ComputeConfig(prefill_chunk=128), inline=True)  # type: ignore[operator]
    waits: list[int] = []  # per decode step during the prefill: batches run while it waited
    prefilling, done = [False], trio.Event()
    batches: list[int] = []  # the batch counter when the prompt arrived and when it was done

    async def decoder(i: int) -> None:
        CLIENT.set(Requester(f"user{i}"))
        cache, x = _cache(span), torch.randn(1, 1, HIDDEN)
        for n in range(1000):
            if done.is_set():
                return
            during, before = prefilling[0], queue.statistics().batches
            await queue.run_span(span, x, _pos(n, 1), cache, Priority.INFERENCE)
            if during and prefilling[0]:
                waits.append(queue.statistics().batches - before)

    async def prompt() -> None:
        CLIENT.set(Requester("newcomer"))
        await trio.sleep(10 * BATCH_SECONDS)  # the decoders are in full swing
        prefilling[0] = True
        batches.append(queue.statistics().batches)
        x = torch.randn(1, 1000, HIDDEN)
        await queue.run_span(span, x, _pos(0, 1000), _cache(span), Priority.INFERENCE)
        batches.append(queue.statistics().batches)
        prefilling[0] = False
        done.set()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(decoder, i)
            nursery.start_soon(prompt)
    chunked = [r for r in queue.statistics().recent if r.bulk_tokens]
    assert [r.bulk_tokens for r in chunked] == [128] * 7 + [104]  # one chunk per batch
    assert all(r.decode_steps == 4 for r in chunked)  # beside all four decoders' steps
    assert batches[1] - batches[0] <= len(chunked) + 1  # the prompt waited for one batch
    assert len(waits) >= 4 * 6 and max(waits) == 1  # each decode step waited for one batch


async def test_sessions_due_back_are_waited_for(
    span: Span, queue_factory: object, autojump_clock: trio.testing.MockClock
) -> None:
    """Two sessions stepping together, one of them late by less than the wait window: the
    worker waits for it and runs both in one batch."""
    queue: ComputeQueue = await queue_factory(  # type: ignore[operator]
        ComputeConfig(gather_fraction=1e6, gather_max=0.5), inline=True
    )
    a1, a2 = _cache(span), _cache(span)
    with trio.fail_after(20):
        for _ in range(3):  # they come back at once, together
            await _steps(span, queue, {"a1": (a1, 0.0), "a2": (a2, 0.0)})
        await _steps(span, queue, {"a1": (a1, 0.0), "a2": (a2, 0.05)})
    assert queue.statistics().recent[-1].decode_steps == 2


async def test_a_due_client_is_waited_for_when_the_ready_steps_fill_the_cap(
    span: Span, queue_factory: object, autojump_clock: trio.testing.MockClock
) -> None:
    """Three clients stepping together while shared batches are small (`shared_batch` 1:
    a step per waiting client): the two ready steps fill the cap as counted without the
    third, which is due; the worker waits for it, since it would add a client to the
    batch, and runs all three together."""
    queue: ComputeQueue = await queue_factory(  # type: ignore[operator]
        ComputeConfig(gather_fraction=1e6, gather_max=0.5), inline=True
    )
    queue.shared_batch = 1
    caches = {name: _cache(span) for name in ("a", "b", "c")}
    with trio.fail_after(20):
        for _ in range(3):
            await _steps(span, queue, {name: (cache, 0.0) for name, cache in caches.items()})
        late = {"a": 0.0, "b": 0.0, "c": 0.05}
        await _steps(span, queue, {name: (caches[name], late[name]) for name in caches})
    assert queue.statistics().recent[-1].decode_steps == 3


async def test_sessions_away_are_not_waited_for(
    span: Span, queue_factory: object, autojump_clock: trio.testing.MockClock
) -> None:
    """Sessions that come back a second after each step (in a chain: they are at another
    hop) are not waited for: another session's step runs at once, not a window later (the
    old rule, "wait for the last batch's clients", idled the server so before every batch
    in a two-hop chain)."""
    window = 0.5
    queue: ComputeQueue = await queue_factory(  # type: ignore[operator]
        ComputeConfig(gather_fraction=1e6, gather_max=window), inline=True
    )
    a1, a2, b = _cache(span), _cache(span), _cache(span)
    with trio.fail_after(30):
        for delay in (0.0, 1.0, 1.0):  # a1 and a2 are away a second between steps
            await _steps(span, queue, {"a1": (a1, delay), "a2": (a2, delay)})
        await trio.sleep(0.05)
        started = trio.current_time()
        await _steps(span, queue, {"b": (b, 0.0)})
        waited = trio.current_time() - started
    assert queue.statistics().recent[-1].decode_clients == (Requester("b"),)
    assert waited < window / 2, waited  # not held back for a1 and a2


async def test_sessions_that_keep_being_due_hold_a_step_one_window_at_most(
    span: Span, queue_factory: object, autojump_clock: trio.testing.MockClock
) -> None:
    """A peer's sessions with staggered return times (each due in turn, none coming back)
    hold another session's ready step at most one window, not one window per session.

    Six sessions learn to come back 0.15 ... 0.9 s after their steps, take one last step
    together and go silent: their expected returns are then about 75 ms apart, from 0.9 to
    1.3 s after it, so from 0.8 s on one of them is always due (for 0.7 s in all)."""
    window = 0.2
    queue: ComputeQueue = await queue_factory(  # type: ignore[operator]
        ComputeConfig(gather_fraction=1e6, gather_max=window), inline=True
    )
    delays = [0.15 * (i + 1) for i in range(6)]
    caches = [_cache(span) for _ in delays]
    x = torch.randn(1, 1, HIDDEN)
    go, learned = trio.Event(), [0]

    async def step(i: int) -> None:
        await queue.run_span(span, x, _pos(caches[i].length, 1), caches[i], Priority.INFERENCE)

    async def staggered(i: int) -> None:
        CLIENT.set(Requester("stagger"))
        for _ in range(3):
            await step(i)
            await trio.sleep(delays[i])
        learned[0] += 1
        if learned[0] == len(delays):
            go.set()
        await go.wait()
        await step(i)  # the last, all together

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i in range(len(delays)):
                nursery.start_soon(staggered, i)
        await trio.sleep(0.8)
        started = trio.current_time()
        await _steps(span, queue, {"b": (_cache(span), 0.0)})
        waited = trio.current_time() - started
    assert waited < 2 * window, waited  # one window and the step itself


async def test_the_worker_reports_what_it_ran(
    span: Span,
    queue_factory: object,
    caplog: pytest.LogCaptureFixture,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Every ``report_interval`` with work in it, one INFO line: two sessions stepping
    together are two decode steps per batch; an idle interval logs nothing."""
    caplog.set_level(logging.INFO, logger="swarm.server.compute")
    queue: ComputeQueue = await queue_factory(  # type: ignore[operator]
        ComputeConfig(report_interval=0.2), inline=True
    )
    a1, a2 = _cache(span), _cache(span)
    with trio.fail_after(20):
        for _ in range(5):
            await _steps(span, queue, {"a1": (a1, 0.0), "a2": (a2, 0.0)})
        while not [r for r in caplog.records if r.getMessage().startswith("compute: ")]:
            await trio.sleep(0.05)
        await trio.sleep(0.5)  # idle intervals
    reports = [r.getMessage() for r in caplog.records if r.getMessage().startswith("compute: ")]
    assert reports and all("2.0 decode steps per batch (largest 2)" in r for r in reports)
    assert sum(int(r.split()[1]) for r in reports) == 5  # batches, each reported once


async def _steps(
    span: Span, queue: ComputeQueue, sessions: dict[str, tuple[KVCache, float]]
) -> None:
    """One decode step of each session (client name: (cache, delay before its step)),
    concurrently."""
    x = torch.randn(1, 1, HIDDEN)

    async def step(client: str, cache: KVCache, delay: float) -> None:
        CLIENT.set(Requester(client))
        await trio.sleep(delay)
        await queue.run_span(span, x, _pos(cache.length, 1), cache, Priority.INFERENCE)

    async with trio.open_nursery() as nursery:
        for client, (cache, delay) in sessions.items():
            nursery.start_soon(step, client, cache, delay)


async def _flood_and_lone(
    span: Span, queue: ComputeQueue, flood: list[Requester], lone: Requester
) -> list[int]:
    """Sessions of ``flood`` step without end while ``lone`` takes 30 steps (joining
    50 ms later); returns, per lone step, how many batches ran while it waited."""
    lone_waits: list[int] = []
    stop = trio.Event()

    async def session(client: Requester, steps: int | None) -> None:
        CLIENT.set(client)
        cache, x = _cache(span), torch.randn(1, 1, HIDDEN)
        for n in range(steps or 1000):
            if stop.is_set():
                return
            batches = queue.statistics().batches
            await queue.run_span(span, x, _pos(n, 1), cache, Priority.INFERENCE)
            if client == lone:
                lone_waits.append(queue.statistics().batches - batches)
        stop.set()

    async with trio.open_nursery() as nursery:
        for client in flood:
            nursery.start_soon(session, client, None)
        await trio.sleep(0.05)
        nursery.start_soon(session, lone, 30)
    return lone_waits


async def test_fair_share_under_a_flood(
    span: Span, queue_factory: object, autojump_clock: trio.testing.MockClock
) -> None:
    """With room for only 4 decode tokens per batch, a client with 16 sessions takes no
    more than its turn: the lone client's step is in every batch it waits for."""
    queue: ComputeQueue = await queue_factory(ComputeConfig(max_batch_tokens=4), inline=True)  # type: ignore[operator]
    flood = Requester("flood")
    lone_waits = await _flood_and_lone(span, queue, [flood] * 16, Requester("lone"))
    assert len(lone_waits) == 30
    assert max(lone_waits) <= 2, lone_waits  # the batch it joined, at most one before it
    flood_per_batch = [r.decode_clients.count(flood) for r in queue.statistics().recent]
    assert max(flood_per_batch) <= 4


async def test_identities_behind_one_address_share_its_turn(
    span: Span, queue_factory: object, autojump_clock: trio.testing.MockClock
) -> None:
    """16 identities at one address, one session each, against a lone client at another:
    while both hosts wait, a batch holds `shared_batch` steps (not one per identity), the
    lone client's step is in every batch it waits for, and the identities take turns."""
    queue: ComputeQueue = await queue_factory(ComputeConfig(), inline=True)  # type: ignore[operator]
    queue.shared_batch = 4
    sybils = [Requester(f"sybil{i}", "10.0.0.2") for i in range(16)]
    lone = Requester("lone", "10.0.0.1")
    lone_waits = await _flood_and_lone(span, queue, sybils, lone)
    assert len(lone_waits) == 30
    assert max(lone_waits) <= 2, lone_waits  # the batch it joined, at most one before it
    shared = [r for r in queue.statistics().recent if lone in r.decode_clients]
    assert len(shared) >= 30 and all(r.decode_steps <= 4 for r in shared)
    served = {c.peer for r in shared for c in r.decode_clients if c.host == "10.0.0.2"}
    assert len(served) == 16  # every identity had turns, none was starved


async def test_full_queue_is_a_limit(span: Span, queue_factory: object) -> None:
    queue: ComputeQueue = await queue_factory(  # type: ignore[operator]
        ComputeConfig(max_queued=8, max_queued_per_client=3)
    )
    refused: list[str] = []

    async def forward(client: str) -> None:
        CLIENT.set(Requester(client))
        try:
            x = torch.randn(1, 200, HIDDEN)
            await queue.run_span(span, x, _pos(0, 200), _cache(span), Priority.FORWARD)
        except LimitExceeded as exc:
            refused.append(str(exc))

    async with trio.open_nursery() as nursery:
        for i in range(12):
            nursery.start_soon(forward, "greedy" if i < 6 else f"other{i}")
            await wait_all_tasks_blocked()  # in this order
    assert len(refused) == 4  # 3 of greedy's 6 beyond its share, 1 past the 8 in all
    assert sum("this client" in text for text in refused) == 3
    assert sum("queue is full" in text for text in refused) == 1


async def test_identities_behind_one_address_share_its_queue(
    span: Span, queue_factory: object
) -> None:
    """Made-up identities do not multiply an address's share of the queue: past
    `max_queued_per_host` jobs of its peers, the next is `LimitExceeded`, while a client at
    another address still gets in."""
    queue: ComputeQueue = await queue_factory(  # type: ignore[operator]
        ComputeConfig(max_queued=16, max_queued_per_client=2, max_queued_per_host=5)
    )
    refused: list[Requester] = []
    served: list[Requester] = []

    async def forward(client: Requester) -> None:
        CLIENT.set(client)
        try:
            x = torch.randn(1, 200, HIDDEN)
            await queue.run_span(span, x, _pos(0, 200), _cache(span), Priority.FORWARD)
            served.append(client)
        except LimitExceeded as exc:
            assert "this address" in str(exc)
            refused.append(client)

    async with trio.open_nursery() as nursery:
        for i in range(8):  # 8 identities, each within its own share of 2
            nursery.start_soon(forward, Requester(f"sybil{i}", "10.0.0.2"))
            await wait_all_tasks_blocked()
        nursery.start_soon(forward, Requester("other", "10.0.0.1"))
    assert len(refused) == 3 and all(c.host == "10.0.0.2" for c in refused)
    assert Requester("other", "10.0.0.1") in served
