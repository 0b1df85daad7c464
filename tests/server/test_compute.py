"""The compute queue runs inference steps before bulk forwards, one at a time.

The order of events is set by waiting for the worker to be busy and for every task to be
blocked (`wait_all_tasks_blocked`), not by sleeping: a loaded machine cannot reorder it.
"""

from __future__ import annotations

import threading

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from swarm.server.compute import ComputeQueue, Priority


async def test_priority_order_and_errors() -> None:
    queue = ComputeQueue()
    order: list[str] = []
    gate = threading.Event()

    def blocker() -> str:
        gate.wait(5)
        return "blocker"

    async with trio.open_nursery() as nursery:
        await nursery.start(queue.run)
        async with trio.open_nursery() as clients:
            clients.start_soon(queue.submit, blocker, Priority.FORWARD)
            await _wait_running(queue)  # the blocker is on the worker thread now

            async def submit(name: str, priority: Priority) -> None:
                order.append(await queue.submit(lambda: name, priority))

            clients.start_soon(submit, "forward", Priority.FORWARD)
            await wait_all_tasks_blocked()  # queued first
            clients.start_soon(submit, "step", Priority.INFERENCE)
            await wait_all_tasks_blocked()
            gate.set()
        assert order == ["step", "forward"]

        def boom() -> None:
            raise ValueError("bad shape")

        with pytest.raises(ValueError, match="bad shape"):
            await queue.submit(boom, Priority.INFERENCE)
        assert queue.statistics().done == 4
        nursery.cancel_scope.cancel()


async def test_cancelled_waiter_is_skipped() -> None:
    queue = ComputeQueue()
    ran: list[str] = []
    gate = threading.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(queue.run)
        nursery.start_soon(queue.submit, lambda: gate.wait(5), Priority.FORWARD)
        await _wait_running(queue)

        async def waiter(*, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
            with trio.CancelScope() as scope:
                task_status.started(scope)
                await queue.submit(lambda: ran.append("cancelled"), Priority.INFERENCE)

        scope = await nursery.start(waiter)
        await wait_all_tasks_blocked()  # queued behind the gate
        scope.cancel()
        await wait_all_tasks_blocked()
        gate.set()
        assert await queue.submit(lambda: "after", Priority.INFERENCE) == "after"
        assert ran == []
        nursery.cancel_scope.cancel()


async def _wait_running(queue: ComputeQueue) -> None:
    """Until the worker runs something (on its thread)."""
    with trio.fail_after(30):
        while not queue.running:
            await trio.sleep(0.001)
