"""`OwnLoad`: the client's own sessions per server, folded into what routes see.

Servers announce their active sessions every TTL/2, so a burst of sessions opened by one
client (a gateway taking 16 requests at once) would all plan against the same stale
announcement and pick the same cheapest replica. `OwnLoad` counts the sessions this client
holds on each server, and its `directory` shows each server with at least that many active
sessions (the announcement may already include them, hence the maximum, not the sum).
`AsyncRemoteModel` opens its sessions one at a time through `OwnLoad.opening`, so each
plan sees the sessions opened just before it; a session that waits more than
``wait_s`` (0.25 s) for its turn (the one before it is stuck opening on a slow server) goes
ahead without it, so one slow open never holds up the others for long.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager

import trio

from swarm.client.discovery import ServerDirectory
from swarm.directory import ServerView
from swarm.types import PeerId

__all__ = ["OwnLoad"]


class OwnLoad:
    """Sessions this client holds per server, and a directory that accounts for them."""

    def __init__(self, directory: ServerDirectory, wait_s: float = 0.25) -> None:
        self.inner = directory
        self.wait_s = wait_s
        self.sessions: Counter[PeerId] = Counter()
        self._opening = trio.Lock()

    @property
    def directory(self) -> ServerDirectory:
        return _LoadedDirectory(self)

    @asynccontextmanager
    async def opening(self) -> AsyncIterator[None]:
        """Held while one session plans and opens (so the next plan sees it), at most
        ``wait_s`` waited for."""
        got = False
        with trio.move_on_after(self.wait_s):
            await self._opening.acquire()
            got = True
        try:
            yield
        finally:
            if got:
                self._opening.release()

    def add(self, peers: Iterable[PeerId]) -> list[PeerId]:
        """Count a session on ``peers``; returns them, for `remove`."""
        counted = list(peers)
        self.sessions.update(counted)
        return counted

    def remove(self, peers: Iterable[PeerId]) -> None:
        self.sessions.subtract(peers)
        for peer in [p for p, n in self.sessions.items() if n <= 0]:
            del self.sessions[peer]


class _LoadedDirectory:
    """``inner``'s servers, each with at least this client's sessions on it."""

    def __init__(self, load: OwnLoad) -> None:
        self._load = load

    @property
    def pings(self) -> Mapping[PeerId, float]:
        return self._load.inner.pings

    def absence_hint(self) -> str:
        return self._load.inner.absence_hint()

    def reached(self, server: ServerView) -> bool:
        return self._load.inner.reached(server)

    def unreachable(self, server: ServerView) -> bool:
        return self._load.inner.unreachable(server)

    async def servers(self, *, refresh: bool = False) -> Sequence[ServerView]:
        views = await self._load.inner.servers(refresh=refresh)
        own = self._load.sessions
        return [
            dataclasses.replace(v, active_sessions=max(v.active_sessions, own[v.peer_id]))
            if own.get(v.peer_id)
            else v
            for v in views
        ]
