"""Timers a DHT node sets per datagram, without an asyncio timer per datagram.

Every request of ours waits for its reply until a deadline, and every datagram held by
emulated links (`swarm.dht.links`) goes out after its delay. One ``loop.call_later`` each
made a ``TimerHandle`` per datagram in asyncio's one heap of timers, which it orders by
comparing handles in Python; a reply left its cancelled timeout in the heap until the
deadline passed. With hundreds of nodes on one loop (the internet simulation) that heap
work was a tenth of the DHT thread's CPU (benchmarks/README.md, "Where a datagram's CPU
goes"). Here:

- `Deadlines`: a node's request timeouts are all the same length, so their deadlines come in
  the order they are set: a queue, and one loop timer for the earliest. A reply does nothing
  to the queue; its deadline passes over a request no longer awaited.
- `LateSends`: the held datagrams of every node on a loop in one heap of tuples (compared in
  C), due times rounded up to `TICK` so that datagrams due within one tick share one loop
  timer. A datagram goes out at most `TICK` later than its delay says.

Both run on the DHT loop thread only.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["TICK", "Deadlines", "LateSends"]

TICK = 0.001  # seconds: held datagrams due within one tick go out together


class Deadlines:
    """Calls ``expire(key)`` ``timeout`` seconds after `add` (the same ``timeout`` for
    every key, so deadlines are in order); the callee ignores keys it no longer awaits."""

    def __init__(self, timeout: float, expire: Callable[[bytes], None]) -> None:
        self._timeout = timeout
        self._expire = expire
        self._queue: deque[tuple[float, bytes]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, key: bytes) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + self._timeout
        self._queue.append((due, key))
        if self._timer is None:
            self._timer = loop.call_at(due, self._fire, loop)

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        queue = self._queue
        # asyncio runs a timer up to its clock resolution early: the head is due regardless
        limit = max(loop.time(), queue[0][0]) if queue else 0.0
        while queue and queue[0][0] <= limit:
            self._expire(queue.popleft()[1])
        if queue and self._timer is None:
            self._timer = loop.call_at(queue[0][0], self._fire, loop)

    def close(self) -> None:
        """Forget every deadline (nothing expires afterwards)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queue.clear()


class LateSends:
    """Datagrams held before they go out, for every node on one event loop (`for_loop`)."""

    def __init__(self) -> None:
        # no reference to the loop (the loop keys `_BY_LOOP` weakly): its timer passes it
        self._heap: list[tuple[float, int, Any, bytes, Any]] = []
        self._order = itertools.count()  # ties: first held, first sent
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    @classmethod
    def for_loop(cls, loop: asyncio.AbstractEventLoop) -> LateSends:
        found = _BY_LOOP.get(loop)
        if found is None:
            found = _BY_LOOP[loop] = cls()
        return found

    def hold(self, delay: float, transport: Any, payload: bytes, addr: Any) -> None:
        """Send ``payload`` to ``addr`` through ``transport`` (an asyncio datagram
        transport) ``delay`` seconds from now (up to `TICK` later), unless it closed."""
        loop = asyncio.get_running_loop()
        due = math.ceil((loop.time() + delay) / TICK) * TICK
        heapq.heappush(self._heap, (due, next(self._order), transport, payload, addr))
        if due < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = due
            self._timer = loop.call_at(due, self._fire, loop)

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        heap = self._heap
        limit = max(loop.time(), self._timer_at)
        self._timer, self._timer_at = None, math.inf
        while heap and heap[0][0] <= limit:
            _, _, transport, payload, addr = heapq.heappop(heap)
            if not transport.is_closing():
                transport.sendto(payload, addr)
        if heap:
            self._timer_at = heap[0][0]
            self._timer = loop.call_at(self._timer_at, self._fire, loop)


_BY_LOOP: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LateSends] = (
    weakref.WeakKeyDictionary()
)
