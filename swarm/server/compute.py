"""The compute worker: one per device, running batched model work in a fair order.

Handlers never call the model directly. Span work (a session's step, a stateless forward)
goes in with `ComputeQueue.run_span`; one worker task drains the queue through
``trio.to_thread.run_sync`` so the trio loop stays responsive while torch computes (a
short lone decode step runs on the loop itself: `ComputeConfig.inline_max`). Only one
batch runs at a time on a device: concurrent matmuls on the same cores only slow each other.

Each time the worker is free it forms one batch (see `swarm.server.batching`):

- every ready one-token decode step, up to `ComputeConfig.max_batch_tokens`, taken round
  robin over clients, runs as one `Span.forward_batch` (projections and MLP over all new
  tokens at once, attention per session against its own cache);
- plus one chunk of at most `ComputeQueue.prefill_chunk` tokens of bulk work (a prompt, a
  stateless forward), chosen fairly over clients, inference before forwards, a forward
  passed over `ComputeConfig.forward_patience` times going first. The chunk rides along
  with the decode steps (on a GPU it costs them little: the weights are read once), and
  its size bounds what it adds to a decode step.

Before forming a batch the worker waits briefly for sessions that are due
(`ComputeConfig.gather_fraction`): each session's time away between the end of its step's
batch and the arrival of its next step is tracked, and a session expected back within the
wait window is waited for, so that sessions stepping together stay in one batch. A session
away for longer (in a chain: at another hop, with its client) is not waited for: the
steps that are ready run at once.

Opaque functions (`submit`) run alone, inference priority before span work, forward
priority after it (and after `forward_patience` batches of it at the latest).

A caller cancelled while its work waits is dropped from the queue; one cancelled while its
chunk runs gets no result (the thread cannot be interrupted). Work is attributed to the
`Requester` in `CLIENT`, which the RPC handlers set to the caller's `PeerId` and address.
"""

from __future__ import annotations

import collections
import contextvars
import heapq
import itertools
import logging
import statistics
import time
import weakref
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
import trio

from swarm.errors import LimitExceeded, ShardError
from swarm.server.batching import (
    Batch,
    BatchRecord,
    BatchTotals,
    ComputeConfig,
    Priority,
    Requester,
    SpanJob,
    decode_cap,
    plan_batch,
    run_batch,
)
from swarm.shards.cache import KVCache
from swarm.shards.span import Span

__all__ = [
    "CLIENT",
    "BatchRecord",
    "ComputeConfig",
    "ComputeQueue",
    "ComputeStatistics",
    "Priority",
    "Requester",
]

T = TypeVar("T")

RunSync = Callable[..., Awaitable[Any]]
"""Runs ``fn(*args)`` off the event loop and returns its result (`trio.to_thread.run_sync`)."""

log = logging.getLogger(__name__)

ANONYMOUS = Requester()
CLIENT: contextvars.ContextVar[Requester] = contextvars.ContextVar(
    "swarm_client", default=ANONYMOUS
)
"""The fairness key of work submitted from this task (the RPC handlers set the caller's
`PeerId` and address; the default groups anonymous work together)."""

DEFAULT_PREFILL_CHUNK = 128


@dataclass(frozen=True)
class ComputeStatistics:
    queued: int  # jobs and functions waiting
    done: int  # jobs, functions and batches finished since start
    utilization: float  # fraction of wall time spent computing
    batches: int  # batched forwards run
    recent: tuple[BatchRecord, ...]  # the last batches, oldest first
    queued_by_client: dict[Requester, int]  # jobs waiting per client


@dataclass
class _Task(Generic[T]):
    fn: Callable[[], T]
    done: trio.Event = field(default_factory=trio.Event)
    result: T | None = None
    error: BaseException | None = None
    cancelled: bool = False


@dataclass
class _Return:
    """When a session's decode steps come back: ``away`` is the median of its last few
    times from the end of its step's batch to the arrival of its next step (a median, so
    that one pause, a user reading or a client between generations, does not make it
    look due long after); ``since`` is when its last batch ended while its next step has
    not arrived (None while it waits here). ``client``: whose session it is."""

    client: Requester
    samples: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=5))
    since: float | None = None

    @property
    def away(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    def left(self, ended: float) -> None:
        self.since = ended

    def came_back(self, arrived: float) -> None:
        if self.since is not None:
            self.samples.append(max(arrived - self.since, 0.0))
        self.since = None

    def expected(self) -> float | None:
        """When its next step should arrive, if it is away and has come back before."""
        away = self.away
        if self.since is None or away is None:
            return None
        return self.since + away


class ComputeQueue:
    """Model work, drained by one worker task.

    Use as ``async with trio.open_nursery() as n: await n.start(queue.run)``, then
    ``await queue.run_span(...)`` or ``await queue.submit(fn, priority)`` from any handler.

    ``run_sync`` is where the work runs: by default a worker thread
    (``trio.to_thread.run_sync``), except a short lone decode step, which runs on the event
    loop (`ComputeConfig.inline_max`). Tests pass one that runs everything in the event
    loop and lets trio's virtual clock stand for its cost, so the queue's timers (the gather
    window, the report) run under ``autojump_clock``. Batch times are read from trio's
    clock (in production the same ``perf_counter`` differences as before).
    """

    def __init__(
        self, config: ComputeConfig | None = None, *, run_sync: RunSync | None = None
    ) -> None:
        config = config or ComputeConfig()
        self.config = config
        self._run_sync: RunSync = run_sync or trio.to_thread.run_sync
        self._may_inline = run_sync is None  # a given run_sync runs everything
        self._lone_seconds: float | None = None  # the last batch of one decode step's time
        self.inlined = 0  # batches run on the event loop
        # set at start-up from the measured timings (`swarm.server.capacity.SpanTimings`):
        self.prefill_chunk = config.prefill_chunk or DEFAULT_PREFILL_CHUNK  # bulk tokens/batch
        self.shared_batch: int | None = None  # decode steps per batch among clients (None: all)
        self._heap: list[tuple[int, int, _Task[Any]]] = []
        self._jobs: list[SpanJob] = []
        self._counter = itertools.count()
        self._wakeup = trio.Event()
        self._busy_seconds = 0.0
        self._done = 0
        self._totals = BatchTotals()  # what ran since start, for the periodic report
        self._turn = 0  # rotates the client that goes first
        # every live cache that ran work here; a session's decode steps time its returns
        self._returns: weakref.WeakKeyDictionary[KVCache, _Return] = weakref.WeakKeyDictionary()
        self._last_seconds = 0.0  # the last batch's compute time
        self._last_end = 0.0  # when it ended (trio clock)
        self._functions_waited = 0  # batches run while a forward-priority function waits
        self._recent: collections.deque[BatchRecord] = collections.deque(maxlen=256)
        self.running = False  # work is on the worker thread now
        self._started = time.monotonic()

    # ---- submitting ----

    async def run_span(
        self,
        span: Span,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None,
        priority: Priority,
    ) -> torch.Tensor:
        """Run ``hidden`` (batch, seq, hidden) at ``positions`` (batch, seq) through ``span``
        (extending ``cache``), batched with other work; returns (batch, seq, hidden) on the
        CPU. Work of more than one chunk needs a ``cache`` (a stateless forward brings a
        temporary one). Raises `LimitExceeded` when the queue (or the client's share of it)
        is full, or the work waited `ComputeConfig.max_wait`; `ShardError` for an empty
        ``hidden`` (no rows or no tokens: nothing would ever run it), and what the span
        raises."""
        if hidden.dim() != 3 or hidden.shape[0] == 0 or hidden.shape[1] == 0:
            raise ShardError(f"span work needs rows and tokens, got shape {list(hidden.shape)}")
        client = CLIENT.get()
        self._check_room(client)
        job = SpanJob(span, hidden, positions, cache, client, priority, next(self._counter))
        if job.is_decode and cache is not None and cache in self._returns:
            self._returns[cache].came_back(job.arrived)
        self._jobs.append(job)
        if job.is_decode and self._inline_now():
            await self._run_alone(job)
        if not job.done.is_set():
            self._wakeup.set()
            await self._wait(job)
        if job.error is not None:
            raise job.error
        return job.result()

    async def _run_alone(self, job: SpanJob) -> None:
        """Run a decode step in its caller's task when the worker would run it alone and
        on the event loop anyway: what the worker does, without waking it and being woken
        by it (two scheduling rounds per step). Where another session has run work here
        (`_sessions_besides`), one checkpoint first lets its steps arriving in the same
        round join the queue, which then batches them as before; a lone session's step
        runs at once (a round less). A caller cancelled there leaves its step to be
        dropped, as in `_wait`."""
        try:
            if self._sessions_besides(job.cache):
                await trio.lowlevel.checkpoint()
            else:
                await trio.lowlevel.checkpoint_if_cancelled()
        except BaseException:
            self._forget(job)
            raise
        if self.running or self._heap or self._jobs != [job] or not self._inline_now():
            return
        window = min(self.config.gather_max, self.config.gather_fraction * self._last_seconds)
        if self.config.batching and window > 0:
            if self._due_deadline(trio.current_time(), window) is not None:
                return  # another session is due: the worker waits for it
        batch = self._plan()
        if batch is None:  # pragma: no cover - the job is live and alone
            return
        self._run_inline(batch)

    def _sessions_besides(self, cache: KVCache | None) -> bool:
        """Whether a cache other than ``cache`` that ran work here is still alive: another
        session (or a stateless forward's temporary cache) whose step could arrive now."""
        return len(self._returns) > (cache is not None and cache in self._returns)

    async def submit(self, fn: Callable[[], T], priority: Priority) -> T:
        """Run `fn` alone on the worker thread when its turn comes; return or raise its
        result. Raises `LimitExceeded` when the queue is full."""
        self._check_room(None)
        task: _Task[T] = _Task(fn)
        heapq.heappush(self._heap, (int(priority), next(self._counter), task))
        self._wakeup.set()
        await self._wait(task)
        if task.error is not None:
            raise task.error
        return task.result  # type: ignore[return-value]

    async def _wait(self, work: SpanJob | _Task[Any]) -> None:
        """Wait for ``work`` at most `ComputeConfig.max_wait`; a caller that leaves (or
        waits too long) takes it out of the queue at once: it stops counting against the
        queue's limits, and the worker forgets it when it next looks."""
        try:
            with trio.move_on_after(self.config.max_wait):
                await work.done.wait()
                return
        except BaseException:
            self._forget(work)
            raise
        self._forget(work)
        raise LimitExceeded(
            f"work waited {self.config.max_wait:g} s in the compute queue; try later"
        )

    def _forget(self, work: SpanJob | _Task[Any]) -> None:
        if work.done.is_set():
            return
        work.cancelled = True
        self._wakeup.set()

    def _live_queued(self) -> int:
        """Work waiting whose caller still waits for it."""
        jobs = sum(1 for job in self._jobs if not job.cancelled)
        return jobs + sum(1 for entry in self._heap if not entry[2].cancelled)

    def _check_room(self, client: Requester | None) -> None:
        cfg = self.config
        if self._live_queued() >= cfg.max_queued:
            raise LimitExceeded(f"compute queue is full ({cfg.max_queued} jobs); try later")
        if client is None:
            return
        shares: tuple[tuple[Callable[[Requester], Hashable], int, str], ...] = (
            (lambda c: c.peer, cfg.max_queued_per_client, "this client has"),
            (lambda c: c.host, cfg.max_queued_per_host, "clients at this address have"),
        )
        for key, most, whose in shares:
            if (mine := key(client)) is None:
                continue
            held = sum(1 for job in self._jobs if key(job.client) == mine and not job.cancelled)
            if held >= most:
                raise LimitExceeded(f"{whose} {held} jobs queued, at most {most}; wait for them")

    # ---- the worker ----

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The worker loop (and its periodic report); runs until cancelled."""
        async with trio.open_nursery() as nursery:
            if self.config.report_interval is not None:
                nursery.start_soon(self._report, self.config.report_interval)
            task_status.started()
            await self._work()

    async def _report(self, interval: float) -> None:
        """Every ``interval`` seconds with batches run in it, one INFO line about them."""
        last = self._totals.snapshot()
        while True:
            await trio.sleep(interval)
            now = self._totals.snapshot()
            if now.batches > last.batches:
                log.info("compute: %s", now.since(last, interval))
            last = now

    async def _work(self) -> None:
        while True:
            self._drop_cancelled()
            task = self._next_function()
            if task is not None:
                await self._run_function(task)
                continue
            await self._gather()
            batch = self._plan()
            if batch is not None:
                await self._run_batch(batch)
                continue
            self._wakeup = trio.Event()
            await self._wakeup.wait()

    async def _gather(self) -> None:
        """Wait (briefly, see `ComputeConfig.gather_fraction`) for sessions that are due
        back within the window, unless the ready decode steps fill a batch already."""
        cfg = self.config
        window = min(cfg.gather_max, cfg.gather_fraction * self._last_seconds)
        if not cfg.batching or window <= 0:
            return
        while not self._heap:
            deadline = self._due_deadline(trio.current_time(), window)
            if deadline is None:
                return
            self._wakeup = trio.Event()
            with trio.move_on_at(deadline):
                await self._wakeup.wait()

    def _due_deadline(self, now: float, window: float) -> float | None:
        """Until when to wait for the sessions away now whose next step is expected within
        ``window`` (each at most a window past its expected time); None: run now."""
        ready = [job for job in self._jobs if not job.cancelled]
        if not ready:
            return None  # nothing to run: the worker sleeps until work comes anyway
        decode = [job for job in ready if job.is_decode]
        if sum(job.rows for job in decode) >= self.config.max_batch_tokens:
            return None  # a full batch is ready
        due = [
            (expected, back.client)
            for back in self._returns.values()
            if (expected := back.expected()) is not None
            and now - window < expected
            and expected <= now + window
        ]
        cap, clients = decode_cap(decode, self.shared_batch), {job.client for job in decode}
        if cap is not None and len(decode) >= cap and all(c in clients for _, c in due):
            return None  # a full batch is ready, and no due session would add a client to it
        # whatever is ready waits at most one window once the worker is free for it, so
        # sessions that keep being due (a peer's many staggered sessions) cannot hold it
        limit = max(min(job.arrived for job in ready), self._last_end) + window
        if not due or limit <= now:
            return None
        return min(max(expected for expected, _ in due) + window, limit)

    def _drop_cancelled(self) -> None:
        if any(job.cancelled for job in self._jobs):
            self._jobs = [job for job in self._jobs if not job.cancelled]
        if any(entry[2].cancelled for entry in self._heap):
            self._heap = [entry for entry in self._heap if not entry[2].cancelled]
            heapq.heapify(self._heap)

    def _next_function(self) -> _Task[Any] | None:
        """An opaque function due now: inference priority at once, forward priority when no
        span work waits or after `forward_patience` batches."""
        if not self._heap:
            return None
        priority = self._heap[0][0]
        overdue = self._functions_waited >= self.config.forward_patience
        if priority == Priority.INFERENCE or not self._jobs or overdue:
            self._functions_waited = 0
            return heapq.heappop(self._heap)[2]
        return None

    async def _run_function(self, task: _Task[Any]) -> None:
        started = trio.current_time()
        self.running = True
        try:
            task.result = await self._run_sync(task.fn)
        except Exception as exc:  # delivered to the submitter, who decides
            task.error = exc
        finally:
            self.running = False
            self._busy_seconds += trio.current_time() - started
            self._done += 1
            task.done.set()

    def _plan(self) -> Batch | None:
        if not self._jobs:
            return None
        cfg = self.config
        batch = plan_batch(
            self._jobs,
            max_batch_tokens=cfg.max_batch_tokens if cfg.batching else 1,
            chunk_tokens=self.prefill_chunk,
            shared_batch=self.shared_batch,
            turn=self._turn,
            forward_patience=cfg.forward_patience,
            batching=cfg.batching,
        )
        self._turn += 1
        return batch

    async def _run_batch(self, batch: Batch) -> None:
        lone = len(batch.slices) == 1 and batch.slices[0].job.is_decode
        if lone and self._inline_now():
            self._run_inline(batch)  # on the event loop: cheaper than the thread's wake-ups
            await trio.lowlevel.checkpoint()
            return
        started = trio.current_time()
        self.running = True
        try:
            await self._run_sync(run_batch, batch)
        finally:
            self._finish(batch, started, lone)

    def _run_inline(self, batch: Batch) -> None:
        """Run a batch of one decode step on the event loop, and finish it."""
        started = trio.current_time()
        self.running = True
        self.inlined += 1
        try:
            run_batch(batch)
        finally:
            self._finish(batch, started, lone=True)

    def _finish(self, batch: Batch, started: float, lone: bool) -> None:
        """A batch ran: time it, record it, hand its finished jobs their results."""
        self.running = False
        seconds = trio.current_time() - started
        if lone:
            self._lone_seconds = seconds
        self._busy_seconds += seconds
        self._last_seconds = seconds
        ended = self._last_end = trio.current_time()
        finished = batch.finished()
        for job in finished:
            if job.cache is not None:  # a prompt's cache too: `_sessions_besides` counts it
                back = self._returns.setdefault(job.cache, _Return(job.client))
                if job.is_decode:
                    back.left(ended)
        if self._heap:
            self._functions_waited += 1
        record = batch.record(seconds)
        self._recent.append(record)
        self._totals.add(record)
        log.debug(
            "batch: %d decode steps, %d bulk tokens, %.1f ms",
            record.decode_steps,
            record.bulk_tokens,
            seconds * 1e3,
        )
        for job in finished:
            self._jobs.remove(job)
            self._done += 1
            job.done.set()

    def _inline_now(self) -> bool:
        """Whether a batch of one decode step runs on the event loop (see
        `ComputeConfig.inline_max`): only once such a batch was timed, and only as long as
        the last one was that short."""
        last, most = self._lone_seconds, self.config.inline_max
        return self._may_inline and last is not None and last <= most

    def statistics(self) -> ComputeStatistics:
        """Queue length, work done, the fraction of time spent computing, recent batches."""
        elapsed = max(time.monotonic() - self._started, 1e-9)
        by_client: dict[Requester, int] = {}
        for job in self._jobs:
            if not job.cancelled:
                by_client[job.client] = by_client.get(job.client, 0) + 1
        return ComputeStatistics(
            queued=self._live_queued(),
            done=self._done,
            utilization=self._busy_seconds / elapsed,
            batches=self._totals.batches,
            recent=tuple(self._recent),
            queued_by_client=by_client,
        )
