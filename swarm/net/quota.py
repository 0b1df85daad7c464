"""Token buckets keyed by who is charged (an address, a peer): rates with a burst."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

import trio

__all__ = ["TokenBuckets"]


class TokenBuckets:
    """One bucket per key, refilled at ``rate`` per second up to ``burst``.

    `try_take` takes only what is there (refusals); `charge` always takes and may leave a
    key in debt, returning how long the caller should wait for the debt to be paid
    (throttling a byte stream); `in_debt` says whether a key has nothing left. At most
    ``max_keys`` keys are remembered (the least recently charged are forgotten: full).
    """

    def __init__(self, rate: float, burst: float, max_keys: int = 16_384) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("a token bucket needs a positive rate and burst")
        self.rate = rate
        self.burst = burst
        self._max_keys = max_keys
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()

    def _level(self, key: Hashable) -> float:
        now = trio.current_time()
        tokens, then = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - then) * self.rate)

    def _store(self, key: Hashable, tokens: float) -> None:
        self._buckets[key] = (tokens, trio.current_time())
        self._buckets.move_to_end(key)
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)

    def try_take(self, key: Hashable, amount: float) -> bool:
        tokens = self._level(key)
        if tokens < amount:
            return False
        self._store(key, tokens - amount)
        return True

    def charge(self, key: Hashable, amount: float) -> float:
        tokens = self._level(key) - amount
        self._store(key, tokens)
        return 0.0 if tokens >= 0 else -tokens / self.rate

    def in_debt(self, key: Hashable) -> bool:
        return key in self._buckets and self._level(key) <= 0
