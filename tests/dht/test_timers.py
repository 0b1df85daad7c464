"""`swarm.dht.timers`: request deadlines and held datagrams without a timer per datagram."""

from __future__ import annotations

import asyncio
from typing import Any

from swarm.dht.timers import TICK, Deadlines, LateSends


class _Transport:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.sent: list[tuple[bytes, Any, float]] = []
        self.closing = False

    def is_closing(self) -> bool:
        return self.closing

    def sendto(self, payload: bytes, addr: Any) -> None:
        self.sent.append((payload, addr, self.loop.time()))


def test_deadlines_expire_in_order_after_the_timeout_and_only_once() -> None:
    async def main() -> list[tuple[bytes, float]]:
        loop = asyncio.get_running_loop()
        expired: list[tuple[bytes, float]] = []
        deadlines = Deadlines(0.05, lambda key: expired.append((key, loop.time())))
        start = loop.time()
        deadlines.add(b"a")
        await asyncio.sleep(0.02)
        deadlines.add(b"b")
        deadlines.add(b"c")
        await asyncio.sleep(0.1)
        deadlines.add(b"d")
        deadlines.close()  # d never expires
        await asyncio.sleep(0.1)
        return [(key, at - start) for key, at in expired]

    expired = asyncio.run(main())
    assert [key for key, _ in expired] == [b"a", b"b", b"c"]
    resolution = 0.002  # asyncio runs timers up to its clock resolution early
    assert expired[0][1] >= 0.05 - resolution
    assert expired[1][1] >= 0.07 - resolution and expired[2][1] >= 0.07 - resolution


def test_held_datagrams_go_out_in_due_order_never_early_and_not_when_closed() -> None:
    async def main() -> tuple[_Transport, _Transport, float, LateSends]:
        loop = asyncio.get_running_loop()
        late = LateSends.for_loop(loop)
        assert LateSends.for_loop(loop) is late  # one per loop, shared by its nodes
        a, b = _Transport(loop), _Transport(loop)
        start = loop.time()
        for i, delay in enumerate((0.06, 0.01, 0.03, 0.01, 0.0005)):
            late.hold(delay, a, bytes([i]), ("127.0.0.1", 1000 + i))
        late.hold(0.02, b, b"b", ("127.0.0.1", 2000))
        b.closing = True  # its node closed before the datagram was due
        await asyncio.sleep(0.1)
        return a, b, start, late

    a, b, start, late = asyncio.run(main())
    assert [p for p, _, _ in a.sent] == [b"\x04", b"\x01", b"\x03", b"\x02", b"\x00"]
    held = {b"\x00": 0.06, b"\x01": 0.01, b"\x02": 0.03, b"\x03": 0.01, b"\x04": 0.0005}
    for payload, _, at in a.sent:
        assert at - start >= held[payload] - 0.002  # never early (clock resolution aside)
    assert b.sent == []
    assert not late._heap


def test_tick_is_small_against_emulated_delays() -> None:
    assert TICK <= 0.001
