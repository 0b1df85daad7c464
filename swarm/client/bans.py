"""`BanList`: servers that failed are left out of routes for a while, longer each time;
`Penalties`: servers that were too slow cost more in routes for a while (and are still used
when nothing else covers their layers)."""

from __future__ import annotations

import math
from collections.abc import Callable

import trio

from swarm.types import PeerId
from swarm.verify.reputation import ban_length

__all__ = ["BanList", "Penalties"]

Clock = Callable[[], float]


class Penalties:
    """Decaying route penalties: ``penalise(peer, amount, half_life_s)`` adds ``amount`` to the
    peer's penalty, which then halves every ``half_life_s`` seconds and is forgotten below
    `FORGET`. A route edge through a penalised server costs ``1 + penalty`` times its modelled
    cost (`plan_route`'s ``penalties``). Times come from ``clock``.
    """

    FORGET = 0.01

    def __init__(self, clock: Clock = trio.current_time) -> None:
        self._clock = clock
        self._entries: dict[PeerId, tuple[float, float, float]] = {}  # value, since, half-life

    def penalise(self, peer: PeerId, amount: float, half_life_s: float) -> float:
        """Add ``amount`` to ``peer``'s penalty (its current, decayed value); returns the sum."""
        value = self.penalty(peer) + amount
        self._entries[peer] = (value, self._clock(), half_life_s)
        return value

    def penalty(self, peer: PeerId) -> float:
        """``peer``'s penalty now (0 when it has none)."""
        entry = self._entries.get(peer)
        if entry is None:
            return 0.0
        value, since, half_life = entry
        now_value = value * math.exp2(-(self._clock() - since) / half_life)
        if now_value < self.FORGET:
            del self._entries[peer]
            return 0.0
        return now_value

    def current(self) -> dict[PeerId, float]:
        """Every penalty now, for `plan_route`."""
        values = {peer: self.penalty(peer) for peer in list(self._entries)}
        return {peer: value for peer, value in values.items() if value > 0}


class BanList:
    """Exponential backoff per peer: the n-th ban lasts ``min(base * factor**(n-1), max_s)``.

    Times come from ``clock`` (``trio.current_time`` by default, so tests can use trio's
    autojump clock). Shared by every session of one client, and so are its `penalties`
    (servers de-preferred, not banned, after a hedged step went elsewhere).
    """

    def __init__(
        self,
        base_s: float,
        factor: float,
        max_s: float,
        clock: Clock = trio.current_time,
    ) -> None:
        self.base_s = base_s
        self.factor = factor
        self.max_s = max_s
        self._clock = clock
        self._failures: dict[PeerId, int] = {}
        self._until: dict[PeerId, float] = {}
        self.penalties = Penalties(clock)

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
