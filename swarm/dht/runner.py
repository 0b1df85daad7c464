"""The one thread that hosts the DHT's asyncio loop, and the bridge trio uses to reach it.

kademlia is asyncio code; swarm is trio. Every DHT node of a process shares one loop thread
(`shared_runner`), so a test with 100 nodes runs one extra thread, not 100. trio calls
`AsyncioRunner.run`, which schedules a coroutine on the loop with
``asyncio.run_coroutine_threadsafe`` and sleeps until a done-callback wakes it through the trio
token. Cancelling the trio caller cancels the asyncio task and waits (briefly) for it to end.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import trio

from swarm.errors import DHTError

__all__ = ["AsyncioRunner", "shared_runner"]

T = TypeVar("T")

_CANCEL_GRACE_S = 2.0
_STOP_TIMEOUT_S = 5.0
# Stores in flight at once across every node of the process: hundreds of concurrent writers
# overflow UDP receive buffers and lose datagrams.
PROCESS_STORE_LIMIT = 16


class AsyncioRunner:
    """An asyncio event loop running in a dedicated daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name="swarm-dht-asyncio", daemon=True)
        self._users = 0
        self.store_slots = asyncio.Semaphore(PROCESS_STORE_LIMIT)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    async def run(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn()`` on the loop and return its result to the trio caller.

        Exceptions raised by the coroutine propagate. If the trio caller is cancelled the
        asyncio task is cancelled too. Raises `DHTError` if the loop has stopped.
        """

        async def call() -> T:
            return await fn()

        if self.loop.is_closed() or not self._thread.is_alive():
            raise DHTError("the DHT loop thread has stopped")
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        def wake(_: concurrent.futures.Future[T]) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        future = asyncio.run_coroutine_threadsafe(call(), self.loop)
        future.add_done_callback(wake)
        try:
            await done.wait()
        except trio.Cancelled:
            future.cancel()
            with trio.move_on_after(_CANCEL_GRACE_S) as scope:
                scope.shield = True
                await done.wait()
            raise
        return future.result()

    def stop(self) -> None:
        """Stop the loop and join its thread (at most a few seconds)."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=_STOP_TIMEOUT_S)
        if not self._thread.is_alive():
            self.loop.close()


_lock = threading.Lock()
_shared: AsyncioRunner | None = None


@contextlib.contextmanager
def shared_runner() -> Iterator[AsyncioRunner]:
    """The process's DHT loop thread, started on first use and stopped when its last user
    leaves."""
    global _shared
    with _lock:
        if _shared is None:
            _shared = AsyncioRunner()
        runner = _shared
        runner._users += 1
    try:
        yield runner
    finally:
        with _lock:
            runner._users -= 1
            if runner._users == 0:
                _shared = None
                runner.stop()
