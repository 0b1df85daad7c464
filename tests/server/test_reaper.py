"""The session table's idle timer, under trio's virtual clock (`autojump_clock`): sessions
nobody steps are closed by the reaper within one period past the idle timeout, whatever
their owners do, and sessions that keep stepping are kept. No real time passes; the handler
side (the client is told why) is `tests/server/test_serving.py::test_idle_sessions_expire`."""

from __future__ import annotations

import os

import trio
import trio.testing

from swarm.errors import ErrorCode
from swarm.identity import Identity
from swarm.server.sessions import Session, SessionLimits, SessionTable
from swarm.types import LayerRange

WHOLE = LayerRange(0, 2)


class _Cache:
    """What a session reads of its cache here (its length); no torch work."""

    length = 0


def _table(limits: SessionLimits) -> SessionTable:
    # the reaper never looks at caches or spans: stand-ins keep this free of torch work
    return SessionTable(limits, lambda layers, batch, length: _Cache(), lambda layers: object())  # type: ignore[arg-type,return-value]


async def test_unused_sessions_are_reaped_on_a_timer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """64 sessions of 8 peers, never stepped, and one that steps every minute: at the idle
    timeout nothing is closed yet; one reaper period later the 64 are closed (their handlers'
    scopes cancelled, told why) and their cache is free; the stepping one stays."""
    limits = SessionLimits(max_sessions=65, max_sessions_per_host=65, max_sessions_per_peer=9,
                           idle_timeout=120.0)  # fmt: skip
    table = _table(limits)
    period = min(limits.idle_timeout / 4, 10.0)  # the reaper's, as documented
    peers = [Identity.generate().peer_id for _ in range(8)]
    async with trio.open_nursery() as nursery:
        await nursery.start(table.run_reaper)
        opened = trio.current_time()
        idle: list[Session] = []
        for peer in peers:
            for _ in range(8):
                session = table.open(os.urandom(16), peer, WHOLE, 8, 1, host="10.0.0.1")
                session.scope = trio.CancelScope()
                idle.append(session)
        busy = table.open(os.urandom(16), peers[0], WHOLE, 8, 1, host="10.0.0.2")
        assert len(table) == 65

        async def keep_stepping() -> None:
            for step in range(10):
                busy.begin_step(step)
                await trio.sleep(60.0)

        nursery.start_soon(keep_stepping)
        await trio.sleep(limits.idle_timeout - 0.5)
        assert len(table) == 65  # not before the timeout
        await trio.sleep(0.5 + period + 0.01)
        assert trio.current_time() - opened <= limits.idle_timeout + period + 0.02
        assert len(table) == 1 and table.get(busy.session_id) is busy
        assert all(s.scope is not None and s.scope.cancel_called for s in idle)
        reasons = {(s.close_reason.code, s.close_reason.message) for s in idle if s.close_reason}
        assert reasons == {(ErrorCode.SESSION, "session closed after 120 s without a step")}
        assert table.free_tokens == limits.cache_tokens - busy.tokens
        await trio.sleep(5 * limits.idle_timeout)  # once it stops stepping, it goes too
        assert len(table) == 0
        nursery.cancel_scope.cancel()


async def test_opening_a_session_closes_the_idle_ones_first(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Without the reaper: a full table whose sessions are idle past the timeout makes room
    for a new one at once (opening closes idle sessions before it counts)."""
    limits = SessionLimits(max_sessions=2, idle_timeout=30.0)
    table = _table(limits)
    peer = Identity.generate().peer_id
    for _ in range(2):
        table.open(os.urandom(16), peer, WHOLE, 8, 1)
    await trio.sleep(31.0)
    table.open(os.urandom(16), peer, WHOLE, 8, 1)
    assert len(table) == 1
