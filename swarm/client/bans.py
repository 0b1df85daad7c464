"""`BanList`: servers that failed are left out of routes for a while, longer each time."""

from __future__ import annotations

from collections.abc import Callable

import trio

from swarm.types import PeerId
from swarm.verify.reputation import ban_length

__all__ = ["BanList"]


class BanList:
    """Exponential backoff per peer: the n-th ban lasts ``min(base * factor**(n-1), max_s)``.

    Times come from ``clock`` (``trio.current_time`` by default, so tests can use trio's
    autojump clock). Shared by every session of one client.
    """

    def __init__(
        self,
        base_s: float,
        factor: float,
        max_s: float,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.base_s = base_s
        self.factor = factor
        self.max_s = max_s
        self._clock = clock
        self._failures: dict[PeerId, int] = {}
        self._until: dict[PeerId, float] = {}

    def ban(self, peer: PeerId) -> float:
        """Ban ``peer`` once more; returns the ban's length in seconds."""
        failures = self._failures.get(peer, 0) + 1
        self._failures[peer] = failures
        length = ban_length(failures, self.base_s, self.factor, self.max_s)
        self._until[peer] = self._clock() + length
        return length

    def is_banned(self, peer: PeerId) -> bool:
        return self._until.get(peer, -1.0) > self._clock()

    def banned(self) -> set[PeerId]:
        """The peers banned right now."""
        now = self._clock()
        return {peer for peer, until in self._until.items() if until > now}

    def failures(self, peer: PeerId) -> int:
        return self._failures.get(peer, 0)
