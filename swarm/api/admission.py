"""Admission control: at most N generations at once, a bounded queue, then 429.

A request takes a `Ticket` at once (`Admission.reserve`): that either counts it in (running
or queued) or raises a 429 `ApiError` with ``Retry-After``. ``async with ticket`` waits for
a running slot (a 429 after ``queue_timeout_s``) and frees everything on exit;
``release`` frees a ticket that never ran. Both are idempotent.
"""

from __future__ import annotations

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


class Admission:
    """Slots for ``max_concurrent`` generations and ``queue`` waiting requests."""

    def __init__(
        self, max_concurrent: int, queue: int, retry_after_s: int, queue_timeout_s: float
    ) -> None:
        self.max_concurrent = max_concurrent
        self.queue = queue
        self.retry_after_s = retry_after_s
        self.queue_timeout_s = queue_timeout_s
        self._slots = trio.Semaphore(max_concurrent)
        self._admitted = 0  # running + queued
        self._running = 0
        self._rejected = 0

    def statistics(self) -> AdmissionStatistics:
        return AdmissionStatistics(
            self._running,
            self._admitted - self._running,
            self.max_concurrent,
            self.queue,
            self._rejected,
        )

    def reserve(self) -> Ticket:
        """Count a request in, or raise a 429 `ApiError` when slots and queue are full."""
        if self._admitted >= self.max_concurrent + self.queue:
            self._rejected += 1
            raise self._busy("the gateway is at its limit of running and queued requests")
        self._admitted += 1
        return Ticket(self)

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

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._counted = True
        self._holding = False

    async def __aenter__(self) -> Ticket:
        admission = self._admission
        with trio.move_on_after(admission.queue_timeout_s):
            await admission._slots.acquire()
            self._holding = True
            admission._running += 1
            return self
        self.release()
        admission._rejected += 1
        raise admission._busy(f"no slot freed within {admission.queue_timeout_s:g} s")

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def release(self) -> None:
        """Free the slot and the count (idempotent)."""
        admission = self._admission
        if self._holding:
            self._holding = False
            admission._running -= 1
            admission._slots.release()
        if self._counted:
            self._counted = False
            admission._admitted -= 1
