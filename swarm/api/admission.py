"""Admission control: at most N generations at once, a bounded queue, then 429, shared fairly.

A request takes a `Ticket` at once (`Admission.reserve`): that either counts it in (running
or queued) or raises a 429 `ApiError` with ``Retry-After``. ``async with ticket`` waits for
a running slot (a 429 after ``queue_timeout_s``) and frees everything on exit;
``release`` frees a ticket that never ran. Both are idempotent.

Fairness between clients. Every request counts in its groups: its client's address (a
public IPv6 /64 is one host) and, where keys are set, its API key. A client alone may use
every slot and the whole queue, but it cannot keep others out:

- when slots and queue are full, a request whose groups hold fewer requests than the busiest
  group's displaces that group's newest queued request (which gets a 429), so a newcomer is
  never refused while the queue holds another client's excess;
- a freed slot goes to the queued request whose groups run the fewest generations (first
  come first served between equals), not simply to the oldest.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

import trio

from swarm.api.errors import ApiError

__all__ = ["Admission", "AdmissionStatistics", "Ticket"]


@dataclass(frozen=True)
class AdmissionStatistics:
    running: int
    queued: int
    max_concurrent: int
    queue: int
    rejected: int
    displaced: int = 0  # queued requests refused to make room for a less busy client


class Admission:
    """Slots for ``max_concurrent`` generations and ``queue`` waiting requests."""

    def __init__(
        self, max_concurrent: int, queue: int, retry_after_s: int, queue_timeout_s: float
    ) -> None:
        self.max_concurrent = max_concurrent
        self.queue = queue
        self.retry_after_s = retry_after_s
        self.queue_timeout_s = queue_timeout_s
        self._admitted: Counter[str] = Counter()  # per group: running + queued
        self._running_by: Counter[str] = Counter()  # per group: running
        self._queued: list[Ticket] = []  # counted and not running, oldest first
        self._waiting: list[Ticket] = []  # of those, the ones waiting for a slot now
        self._count = 0  # running + queued
        self._running = 0
        self._rejected = 0
        self._displaced = 0

    def statistics(self) -> AdmissionStatistics:
        return AdmissionStatistics(
            self._running,
            self._count - self._running,
            self.max_concurrent,
            self.queue,
            self._rejected,
            self._displaced,
        )

    def reserve(self, groups: Sequence[str] = ()) -> Ticket:
        """Count a request of ``groups`` (e.g. ``("host:10.0.0.7", "key:3f2a")``) in, or
        raise a 429 `ApiError` when slots and queue are full of requests of clients at
        least as busy as this one."""
        groups = tuple(dict.fromkeys(groups))
        if self._count >= self.max_concurrent + self.queue:
            victim = self._displaceable(groups)
            if victim is None:
                self._rejected += 1
                raise self._busy("the gateway is at its limit of running and queued requests")
            self._displaced += 1
            victim._displace()
        ticket = Ticket(self, groups)
        self._queued.append(ticket)
        self._count += 1
        self._admitted.update(groups)
        return ticket

    def _load(self, groups: Sequence[str], counts: Counter[str]) -> int:
        return max((counts[g] for g in groups), default=0)

    def _displaceable(self, groups: Sequence[str]) -> Ticket | None:
        """The newest queued request of the busiest group, if that group holds at least two
        more requests than the newcomer's (one more would only swap their places)."""
        mine = self._load(groups, self._admitted)
        best: Ticket | None = None
        best_load = mine + 1
        for ticket in reversed(self._queued):  # newest first: ties keep the newest
            load = self._load(ticket.groups, self._admitted)
            if load > best_load:
                best, best_load = ticket, load
        return best

    def _dispatch(self) -> None:
        """Give free slots to the queued requests whose groups run the fewest."""
        while self._waiting and self._running < self.max_concurrent:
            chosen = min(self._waiting, key=lambda t: self._load(t.groups, self._running_by))
            self._waiting.remove(chosen)
            self._queued.remove(chosen)
            chosen._start()

    def _busy(self, message: str) -> ApiError:
        return ApiError(
            429,
            f"{message}; retry after {self.retry_after_s} s",
            type="rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(self.retry_after_s)},
        )


class Ticket:
    """One admitted request; ``async with`` runs it in a slot."""

    def __init__(self, admission: Admission, groups: tuple[str, ...]) -> None:
        self._admission = admission
        self.groups = groups
        self._counted = True
        self._holding = False
        self._displaced = False
        self._wake = trio.Event()

    async def __aenter__(self) -> Ticket:
        admission = self._admission
        if not self._counted:
            raise admission._busy(
                "the queue is full and this client holds more of it than "
                "others: a request of a less busy client took its place"
            )
        admission._waiting.append(self)
        admission._dispatch()
        with trio.move_on_after(admission.queue_timeout_s):
            await self._wake.wait()
        if self._holding:
            return self
        displaced = self._displaced
        self.release()
        if displaced:
            raise admission._busy(
                "the queue is full and this client holds more of it than "
                "others: a request of a less busy client took its place"
            )
        admission._rejected += 1
        raise admission._busy(f"no slot freed within {admission.queue_timeout_s:g} s")

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def _start(self) -> None:
        admission = self._admission
        self._holding = True
        admission._running += 1
        admission._running_by.update(self.groups)
        self._wake.set()

    def _displace(self) -> None:
        self._displaced = True
        self._uncount()
        self._wake.set()

    def _uncount(self) -> None:
        admission = self._admission
        if self in admission._waiting:
            admission._waiting.remove(self)
        if self in admission._queued:
            admission._queued.remove(self)
        if self._counted:
            self._counted = False
            admission._count -= 1
            admission._admitted.subtract(self.groups)
            admission._admitted += Counter()  # drop groups at zero

    def release(self) -> None:
        """Free the slot and the count (idempotent)."""
        admission = self._admission
        self._uncount()
        if self._holding:
            self._holding = False
            admission._running -= 1
            admission._running_by.subtract(self.groups)
            admission._running_by += Counter()
            admission._dispatch()
