"""`HeadBatcher`: the logits of a client's concurrent generations, computed together, off the
event loop.

Each generation needs the head (final norm + lm_head over the whole vocabulary) once per step:
for a 32,000 × 1,024 head that is ~9 ms of one thread per token per generation, which on the
event loop stalls every other generation and the network. The batcher runs the head in a
worker thread and gives it every row that became due while it was busy, so that 8 concurrent
generations cost about one pass over the head weights instead of eight (a matmul of 8 rows
reads the weights once).

A lone generation's head pass runs on the event loop itself when the last lone pass took
at most ``inline_max`` (10 ms): with nothing else to serve, the hand-off to the thread and
back only adds two wake-ups per token. While several generations use the batcher (`user`),
every pass goes to the thread.

Results may differ from a lone run's in the last bits: MKL sums a matmul of several rows in
another order than a single row's (measured: float32 logits within 1e-5, the same argmax).
Greedy rows (``greedy=True``) go through the head's greedy screen where it has one
(`Head.greedy_logits`): their argmax is the float head's on each row alone, whatever else
shares the pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import trio

from swarm.errors import SessionError
from swarm.shards import Head

__all__ = ["INLINE_MAX", "HeadBatcher", "HeadStatistics"]

INLINE_MAX = 0.01  # seconds: a lone generation's pass this short runs on the event loop


@dataclass(frozen=True)
class HeadStatistics:
    calls: int  # head forwards run
    rows: int  # positions they covered
    requests: int  # `logits` calls served
    inlined: int = 0  # passes run on the event loop (a lone generation's short ones)


class _Request:
    def __init__(self, hidden: torch.Tensor, greedy: bool) -> None:
        self.hidden = hidden  # (rows, hidden)
        self.greedy = greedy
        self.result: torch.Tensor | None = None
        self.error: BaseException | None = None
        self.done = trio.Event()


class HeadBatcher:
    """Logits for rows of hidden states, batched across concurrent callers.

    Use `logits` from any trio task of the loop that runs `run` (a service: ``await
    nursery.start(batcher.run)``). Without a running service, `logits` computes alone, in a
    worker thread.
    """

    def __init__(self, head: Head, *, inline_max: float = INLINE_MAX) -> None:
        self.head = head
        self.inline_max = inline_max
        self._pending: list[_Request] = []
        self._wakeup = trio.Event()
        self._running = False
        self._calls = self._rows = self._requests = self._inlined = 0
        self._users = 0  # generations using the batcher now (`user`)
        self._lone_seconds: float | None = None  # the last pass of one request's rows

    @contextmanager
    def user(self) -> Iterator[None]:
        """Count one generation asking for logits while the context is open: only while
        one is alone may its short passes run on the event loop (see the module)."""
        self._users += 1
        try:
            yield
        finally:
            self._users -= 1

    async def logits(self, hidden: torch.Tensor, *, greedy: bool = False) -> torch.Tensor:
        """Float32 logits (rows, vocab) for ``hidden`` (rows, hidden_size); with ``greedy``,
        only for taking each row's argmax (`Head.greedy_logits`: the same argmax, cheaper)."""
        self._requests += 1
        if self._inline_now():
            self._inlined += 1
            out = await self._pass(hidden, greedy, inline=True)
            # a cancellation point without a scheduling round: the caller's next step
            # sends (and yields) anyway, and a round here is one more per token
            await trio.lowlevel.checkpoint_if_cancelled()
            return out
        if not self._running:
            return await self._pass(hidden, greedy)
        request = _Request(hidden, greedy)
        self._pending.append(request)
        self._wakeup.set()
        await request.done.wait()
        if request.error is not None:
            raise request.error
        assert request.result is not None  # set before done
        return request.result

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve `logits` calls until cancelled."""
        self._running = True
        task_status.started()
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                batch, self._pending = self._pending, []
                if batch:
                    await self._serve(batch)
        finally:
            self._running = False
            for request in self._pending:  # callers left behind get an error, not a hang
                request.error = SessionError("the client closed while this step waited")
                request.done.set()

    async def _serve(self, batch: list[_Request]) -> None:
        for greedy in (False, True):
            part = [r for r in batch if r.greedy is greedy]
            if part:
                await self._serve_part(part, greedy)

    def _inline_now(self) -> bool:
        last = self._lone_seconds
        alone = self._users == 1 and not self._pending
        return alone and last is not None and last <= self.inline_max

    async def _pass(
        self, rows: torch.Tensor, greedy: bool, *, inline: bool = False, lone: bool = True
    ) -> torch.Tensor:
        """One head pass over ``rows``: on the event loop when ``inline``, else in the worker
        thread; counted, and timed when ``lone`` (one request's rows)."""
        self._calls += 1
        self._rows += rows.shape[0]
        started = trio.current_time()
        if inline:
            out = self._forward(rows, greedy)
        else:
            out = await trio.to_thread.run_sync(self._forward, rows, greedy)
        if lone:
            self._lone_seconds = trio.current_time() - started
        return out

    async def _serve_part(self, batch: list[_Request], greedy: bool) -> None:
        rows = torch.cat([r.hidden for r in batch])  # (total rows, hidden)
        try:
            out = await self._pass(rows, greedy, lone=len(batch) == 1)
        except Exception as exc:
            for request in batch:
                request.error = exc
                request.done.set()
            return
        start = 0
        for request in batch:
            n = request.hidden.shape[0]
            request.result = out[start : start + n]
            start += n
            request.done.set()

    def _forward(self, rows: torch.Tensor, greedy: bool) -> torch.Tensor:
        with torch.inference_mode():
            head = self.head.greedy_logits if greedy else self.head.logits
            return head(rows.unsqueeze(0))[0].float()  # (rows, vocab)

    def statistics(self) -> HeadStatistics:
        return HeadStatistics(self._calls, self._rows, self._requests, self._inlined)
