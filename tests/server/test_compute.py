"""The compute queue runs inference steps before bulk forwards, one at a time."""

from __future__ import annotations

import threading

import pytest
import trio

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
            await trio.sleep(0.05)  # the blocker is now running on the worker thread

            async def submit(name: str, priority: Priority) -> None:
                order.append(await queue.submit(lambda: name, priority))

            clients.start_soon(submit, "forward", Priority.FORWARD)
            await trio.sleep(0.01)
            clients.start_soon(submit, "step", Priority.INFERENCE)
            await trio.sleep(0.01)
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
        await trio.sleep(0.05)
        with trio.move_on_after(0.05):
            await queue.submit(lambda: ran.append("cancelled"), Priority.INFERENCE)
        gate.set()
        assert await queue.submit(lambda: "after", Priority.INFERENCE) == "after"
        assert ran == []
        nursery.cancel_scope.cancel()
