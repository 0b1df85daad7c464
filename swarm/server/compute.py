"""The compute worker: one per device, running model work in priority order.

Handlers never call the model directly. They submit a function with a priority
(`Priority.INFERENCE` before `Priority.FORWARD`), and one worker runs the queue through
``trio.to_thread.run_sync`` so the trio loop stays responsive while torch computes. Only one
task runs at a time on a device: concurrent matmuls on the same cores only slow each other.

A caller cancelled while its task waits in the queue removes it; one cancelled while its
task runs gets no result (the thread cannot be interrupted), and the worker moves on.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Generic, TypeVar

import trio

__all__ = ["ComputeQueue", "ComputeStatistics", "Priority"]

T = TypeVar("T")


@dataclass(frozen=True)
class ComputeStatistics:
    queued: int  # tasks waiting
    done: int  # tasks finished since start
    utilization: float  # fraction of wall time spent computing

class Priority(IntEnum):
    """Lower runs first."""

    INFERENCE = 0  # one step of a live session: a user is waiting for a token
    FORWARD = 1  # stateless bulk forward: prefill checks, spot-checks, recovery replays


@dataclass
class _Task(Generic[T]):
    fn: Callable[[], T]
    done: trio.Event = field(default_factory=trio.Event)
    result: T | None = None
    error: BaseException | None = None
    cancelled: bool = False


class ComputeQueue:
    """A priority queue of model work, drained by one worker task.

    Use as ``async with trio.open_nursery() as n: await n.start(queue.run)``, then
    ``await queue.submit(fn, Priority.INFERENCE)`` from any handler.
    """

    def __init__(self, *, max_queued: int = 1024) -> None:
        self._heap: list[tuple[int, int, _Task[Any]]] = []
        self._counter = itertools.count()
        self._wakeup = trio.Event()
        self._max_queued = max_queued
        self._busy_seconds = 0.0
        self._done = 0
        self.running = False  # a task is on the worker thread now
        self._started = time.monotonic()

    async def submit(self, fn: Callable[[], T], priority: Priority) -> T:
        """Run `fn` on the worker thread when its turn comes; return or raise its result.

        Raises `RuntimeError` when the queue is full (the caller maps it to a limit error).
        """
        if len(self._heap) >= self._max_queued:
            raise RuntimeError(f"compute queue is full ({self._max_queued} tasks)")
        task: _Task[T] = _Task(fn)
        heapq.heappush(self._heap, (int(priority), next(self._counter), task))
        self._wakeup.set()
        try:
            await task.done.wait()
        except BaseException:
            task.cancelled = True
            raise
        if task.error is not None:
            raise task.error
        return task.result  # type: ignore[return-value]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The worker loop; runs until cancelled."""
        task_status.started()
        while True:
            if not self._heap:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                continue
            _, _, task = heapq.heappop(self._heap)
            if task.cancelled:
                continue
            started = time.perf_counter()
            self.running = True
            try:
                task.result = await trio.to_thread.run_sync(task.fn)
            except Exception as exc:  # delivered to the submitter, who decides
                task.error = exc
            finally:
                self.running = False
                self._busy_seconds += time.perf_counter() - started
                self._done += 1
                task.done.set()

    def statistics(self) -> ComputeStatistics:
        """Queue length, tasks done, and the fraction of time spent computing."""
        elapsed = max(time.monotonic() - self._started, 1e-9)
        return ComputeStatistics(
            queued=len(self._heap), done=self._done, utilization=self._busy_seconds / elapsed
        )
