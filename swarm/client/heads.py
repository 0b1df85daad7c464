"""`HeadBatcher`: the logits of a client's concurrent generations, computed together, off the
event loop.

Each generation needs the head (final norm + lm_head over the whole vocabulary) once per step:
for a 32,000 × 1,024 head that is ~9 ms of one thread per token per generation, which on the
event loop stalls every other generation and the network. The batcher runs the head in a
worker thread and gives it every row that became due while it was busy, so that 8 concurrent
generations cost about one pass over the head weights instead of eight (a matmul of 8 rows
reads the weights once).

Results may differ from a lone run's in the last bits: MKL sums a matmul of several rows in
another order than a single row's (measured: float32 logits within 1e-5, the same argmax).
Greedy rows (``greedy=True``) go through the head's greedy screen where it has one
(`Head.greedy_logits`): their argmax is the float head's on each row alone, whatever else
shares the pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import trio

from swarm.errors import SessionError
from swarm.shards import Head

__all__ = ["HeadBatcher", "HeadStatistics"]


@dataclass(frozen=True)
class HeadStatistics:
    calls: int  # head forwards run
    rows: int  # positions they covered
    requests: int  # `logits` calls served


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

    def __init__(self, head: Head) -> None:
        self.head = head
        self._pending: list[_Request] = []
        self._wakeup = trio.Event()
        self._running = False
        self._calls = self._rows = self._requests = 0

    async def logits(self, hidden: torch.Tensor, *, greedy: bool = False) -> torch.Tensor:
        """Float32 logits (rows, vocab) for ``hidden`` (rows, hidden_size); with ``greedy``,
        only for taking each row's argmax (`Head.greedy_logits`: the same argmax, cheaper)."""
        self._requests += 1
        if not self._running:
            self._calls += 1
            self._rows += hidden.shape[0]
            return await trio.to_thread.run_sync(self._forward, hidden, greedy)
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

    async def _serve_part(self, batch: list[_Request], greedy: bool) -> None:
        rows = torch.cat([r.hidden for r in batch])  # (total rows, hidden)
        self._calls += 1
        self._rows += rows.shape[0]
        try:
            out = await trio.to_thread.run_sync(self._forward, rows, greedy)
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
        return HeadStatistics(self._calls, self._rows, self._requests)
