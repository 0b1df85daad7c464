"""`ThroughputKeeper`: what a server says it can do, from its first estimate to the full
measurement, and what it serves by.

A server goes online on a first estimate: the timings kept from its last start with the same
key (`swarm.server.timings_store`), or else one layer timed and scaled, erring slow
(`swarm.server.capacity.estimate_span`). Once online it measures its span fully
(`SpanMeasurement`), job by job at forward priority so that sessions' steps run between the
pieces, serves by the result, announces it at once and keeps it for the next start. The
timings set the announced throughput, the prefill chunk and the shared batch; only the full
measurement refuses forwards it predicts too slow.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from swarm.server.capacity import SpanMeasurement, SpanTimings, estimate_span
from swarm.server.compute import ComputeQueue, Priority
from swarm.server.config import ServerConfig
from swarm.server.handlers import ServingState
from swarm.server.timings_store import TimingsKey, TimingsStore, device_description
from swarm.shards import Span

__all__ = ["ThroughputKeeper"]

log = logging.getLogger(__name__)


class ThroughputKeeper:
    """The timings ``span`` is served by, set on ``state`` and ``queue``."""

    def __init__(
        self,
        config: ServerConfig,
        span: Span,
        state: ServingState,
        queue: ComputeQueue,
        the_model_id: str,
        *,
        progress: Callable[[str], None],
    ) -> None:
        self.config = config
        self.span = span
        self.state = state
        self.queue = queue
        self._progress = progress
        self._store = _timings_store(config, span, the_model_id)

    async def first_estimate(self) -> None:
        """Serve by a first estimate until the online measurement: the timings kept from the
        last start with the same key, or else one layer timed and scaled (erring slow)."""
        kept = None if self._store is None else self._store[0].load(self._store[1])
        if kept is not None:
            self._progress("throughput: the last start's measurement (measuring again online)")
            self._apply(kept, final=False)
            return
        self._progress("estimating throughput from one layer (measuring fully online)")
        first = await self.queue.submit(lambda: estimate_span(self.span), Priority.FORWARD)
        self._apply(first, final=False)

    async def measure_online(self, announce: Callable[[], Awaitable[None]]) -> None:
        """The whole measurement, job by job at forward priority, so sessions' steps run
        between its pieces; then ``announce`` at once (the first estimate is rough) and keep
        it for the next start."""
        measurement = SpanMeasurement(self.span)
        for job in measurement.jobs():
            await self.queue.submit(job, Priority.FORWARD)
        timings = measurement.result()
        self._apply(timings, final=True)
        log.info("throughput measured online: %.1f tokens/s", self.state.throughput)
        if self._store is not None:
            store, key = self._store
            await trio.to_thread.run_sync(store.save, key, timings)
        await announce()

    def _apply(self, timings: SpanTimings, *, final: bool) -> None:
        """Serve by ``timings``: the announced throughput, the prefill chunk, the shared batch
        (and, once ``final``, the refusal of forwards it predicts too slow)."""
        compute, state = self.config.compute, self.state
        state.timings, state.throughput = timings, timings.throughput(1)
        state.timings_final = final
        self.queue.prefill_chunk = compute.prefill_chunk or timings.prefill_chunk()
        self.queue.shared_batch = timings.batch_within(compute.max_slowdown)


def _timings_store(
    config: ServerConfig, span: Span, the_model_id: str
) -> tuple[TimingsStore, TimingsKey] | None:
    """Where ``span``'s timings are kept between starts, and their key (None: not kept)."""
    if config.timings_dir is None:
        return None
    key = TimingsKey(
        model_id=the_model_id,
        layers=span.layers,
        dtype=str(span.dtype).removeprefix("torch."),
        quantization=span.quantization.value,
        device=device_description(span.device),
        num_threads=config.num_threads,
    )
    return TimingsStore(config.timings_dir), key
