"""What goes into one batched forward: jobs, chunks, and the fair choice among them.

A `SpanJob` is one piece of span work waiting on the compute queue: a session's step (a
one-token decode step or a multi-token prompt) or a stateless forward. `plan_batch` picks
the next `Batch` (pure, no torch work); `run_batch` runs it on the worker thread with
`Span.forward_batch`. Bulk jobs (more than one token per row) advance one chunk per batch;
their outputs are joined when the last chunk is done.

Fairness: jobs are taken round robin over hosts, and within a host over its peers (the
host and peer that go first rotate from batch to batch), so a client's share of a batch
grows neither with its number of sessions nor with the identities it makes up behind one
address while others wait; a quota is a count over `SpanJob.client`.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from enum import IntEnum

import torch
import trio

from swarm.errors import ConfigError
from swarm.shards.cache import KVCache
from swarm.shards.span import BatchItem, Span
from swarm.types import LayerRange

__all__ = [
    "Batch",
    "BatchRecord",
    "BatchTotals",
    "ComputeConfig",
    "Priority",
    "Requester",
    "SpanJob",
    "decode_cap",
    "plan_batch",
    "run_batch",
]


@dataclass(frozen=True)
class ComputeConfig:
    """How the compute worker batches.

    - ``max_batch_tokens`` (1024): decode tokens in one batch.
    - ``prefill_chunk`` (None: measured at start-up, see
      `swarm.server.capacity.choose_prefill_chunk`; 128 when nothing is measured): bulk
      tokens (prompt or forward) in one batch.
    - ``max_queued`` (1024) jobs waiting in all, ``max_queued_per_client`` (256) for one
      peer, ``max_queued_per_host`` (512) for all peers at one address: past them
      `LimitExceeded`.
    - ``forward_patience`` (4): batches a waiting stateless forward lets inference bulk work
      go first.
    - ``max_slowdown`` (1.25): while several clients have decode steps ready, a batch
      holds at most as many as the measured timings run within this factor of one step's
      time (`ComputeQueue.shared_batch`), or a step per waiting client if that is more
      (the peers at one address count as one while other addresses wait), taken round
      robin over hosts and each host's peers: a client with one session is in every
      batch, one with many sessions, or many identities at one address, shares what is
      left. A single client's steps are all batched (that is fastest for each of them).
      The factor is below the 2x a client may see: the timings are the quiet best of a
      few runs, and live batches, among other clients' network work, ran 1.1-1.5x slower
      than them (`tests/server/test_flood.py`).
    - ``gather_fraction`` (1.0) and ``gather_max`` (60 ms): the wait window, this fraction
      of the last batch's time, at most ``gather_max`` seconds. A session whose next decode
      step is expected (from its past returns) within the window is waited for, and no
      longer than a window past when it was expected, so sessions that stepped together
      stay in one batch instead of splitting into a batch of one and the rest. Where a
      step's cost hardly grows with the batch (reading the weights bounds it), a batch
      the late session would run on its own later costs as much as the one it missed:
      with a window of a whole batch (not half, at most 20 ms, as before) 8 sessions
      through a two-server chain got 4.3-4.4x one session's tokens/s instead of 3.4x
      (`benchmarks/batching.py`, bfloat16).
    - ``batching`` (True): False runs every job alone, one chunk at a time (for
      comparison).
    - ``max_wait`` (120 s): the longest a caller waits for its work (queued and running);
      past it the work leaves the queue and the caller gets `LimitExceeded`, so a queue
      cannot hold work forever (a client gives up on a step after 30 s by default).
    - ``report_interval`` (60 s; None: never): how often the worker logs (INFO) what it
      ran since the last report: batches, decode steps per batch, bulk tokens, busy time.
    - ``inline_max`` (10 ms; 0: never): a batch of one decode step runs on the event loop
      instead of the worker thread when the last such batch took at most this long. The
      hand-off to the thread and back wakes two threads per step: 0.35-1.14 ms of a 3-hop
      tiny chain's 3.3-6.2 ms per hop on a 2-core machine (`benchmarks/hops.py`), more than
      holding the loop for so short a step costs anything else (other sessions' work
      would wait for the same compute anyway). Larger batches, prompt chunks and slow
      steps keep the loop free.
    """

    max_batch_tokens: int = 1024
    prefill_chunk: int | None = None
    max_queued: int = 1024
    max_queued_per_client: int = 256
    max_queued_per_host: int = 512
    forward_patience: int = 4
    max_slowdown: float = 1.25
    gather_fraction: float = 1.0
    gather_max: float = 0.06
    batching: bool = True
    max_wait: float = 120.0
    report_interval: float | None = 60.0
    inline_max: float = 0.01

    def __post_init__(self) -> None:
        if self.max_batch_tokens < 1:
            raise ConfigError(f"max_batch_tokens must be >= 1, got {self.max_batch_tokens}")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise ConfigError(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")
        if min(self.max_queued, self.max_queued_per_client, self.max_queued_per_host) < 1:
            raise ConfigError("max_queued, max_queued_per_client and _per_host must be >= 1")
        if not self.max_wait > 0:
            raise ConfigError(f"max_wait must be > 0, got {self.max_wait}")
        if not self.inline_max >= 0:
            raise ConfigError(f"inline_max must be >= 0, got {self.inline_max}")
        if self.report_interval is not None and self.report_interval <= 0:
            raise ConfigError(f"report_interval must be > 0, got {self.report_interval}")


class Priority(IntEnum):
    """Lower runs first."""

    INFERENCE = 0  # a step of a live session: a user is waiting for a token
    FORWARD = 1  # stateless bulk forward: prefill checks, spot-checks, recovery replays


@dataclass(frozen=True)
class Requester:
    """Whom span work is for: the fairness key. ``peer`` is the caller (a `PeerId`; None
    groups anonymous work), ``host`` the address it called from: the peers at one address
    share that host's turn, as they share its quotas (`swarm.server.quotas`), so a
    factory of identities behind one address counts as one client."""

    peer: Hashable = None
    host: str | None = None


@dataclass(eq=False)
class SpanJob:
    """Span work of one caller: ``hidden`` (rows, seq, hidden) at ``positions`` (rows, seq),
    extending ``cache``. ``offset`` tokens per row are done; ``outputs`` holds their
    results (CPU), one tensor per chunk."""

    span: Span
    hidden: torch.Tensor
    positions: torch.Tensor
    cache: KVCache | None
    client: Requester
    priority: Priority
    order: int  # arrival number
    offset: int = 0
    outputs: list[torch.Tensor] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None
    cancelled: bool = False
    passed_over: int = 0  # batches run without this job since it last advanced
    arrived: float = field(default_factory=trio.current_time)  # trio clock
    # read from ``hidden`` once (planning a batch asks for them dozens of times a step):
    rows: int = field(init=False)
    seq: int = field(init=False)
    is_decode: bool = field(init=False)  # one new token a row: batched with all such steps

    def __post_init__(self) -> None:
        self.rows, self.seq = int(self.hidden.shape[0]), int(self.hidden.shape[1])
        self.is_decode = self.seq == 1

    @property
    def finished(self) -> bool:
        return self.error is not None or self.offset >= self.seq

    def result(self) -> torch.Tensor:
        """The whole output (rows, seq, hidden), once finished."""
        if len(self.outputs) == 1:
            return self.outputs[0]
        return torch.cat(self.outputs, dim=1)  # (rows, seq, hidden)


@dataclass(frozen=True)
class BatchRecord:
    """What one batch held and cost (`ComputeQueue.statistics().recent`)."""

    decode_steps: int  # decode jobs (sessions' one-token steps)
    decode_clients: tuple[Requester, ...]  # their clients, one entry per step
    bulk_tokens: int  # tokens of prompt/forward chunks
    bulk_priorities: tuple[Priority, ...]  # one entry per chunk
    seconds: float


@dataclass
class BatchTotals:
    """Batches run since start (cumulative), and the largest decode batch since the last
    snapshot."""

    batches: int = 0
    decode_steps: int = 0
    bulk_tokens: int = 0
    seconds: float = 0.0
    largest: int = 0

    def add(self, record: BatchRecord) -> None:
        self.batches += 1
        self.decode_steps += record.decode_steps
        self.bulk_tokens += record.bulk_tokens
        self.seconds += record.seconds
        self.largest = max(self.largest, record.decode_steps)

    def snapshot(self) -> BatchTotals:
        copy = replace(self)
        self.largest = 0
        return copy

    def since(self, earlier: BatchTotals, interval: float) -> str:
        """What ran between ``earlier`` and this snapshot, ``interval`` seconds apart."""
        batches = self.batches - earlier.batches
        steps = self.decode_steps - earlier.decode_steps
        busy = (self.seconds - earlier.seconds) / interval
        return (
            f"{batches} batches in the last {interval:g} s, "
            f"{steps / batches:.1f} decode steps per batch (largest {self.largest}), "
            f"{self.bulk_tokens - earlier.bulk_tokens} prompt/forward tokens, "
            f"busy {min(busy, 1.0):.0%} of the time"
        )


@dataclass(frozen=True)
class Slice:
    """Tokens ``start:stop`` of every row of ``job``."""

    job: SpanJob
    start: int
    stop: int


@dataclass(frozen=True)
class Batch:
    slices: tuple[Slice, ...]

    @property
    def bulk_tokens(self) -> int:
        return sum((s.stop - s.start) * s.job.rows for s in self.slices if not s.job.is_decode)

    def finished(self) -> list[SpanJob]:
        return [s.job for s in self.slices if s.job.finished]

    def record(self, seconds: float) -> BatchRecord:
        decode = [s.job for s in self.slices if s.job.is_decode]
        bulk = [s.job for s in self.slices if not s.job.is_decode]
        return BatchRecord(
            len(decode),
            tuple(job.client for job in decode),
            self.bulk_tokens,
            tuple(job.priority for job in bulk),
            seconds,
        )


def round_robin(jobs: Iterable[SpanJob], turn: int) -> Iterator[SpanJob]:
    """``jobs`` interleaved one per host per round; a host's turns go to its peers in
    rotation, each peer's jobs in arrival order. The host, and the peer within each host,
    that goes first rotates with ``turn``."""
    hosts: dict[str | None, dict[Hashable, list[SpanJob]]] = {}
    for job in sorted(jobs, key=lambda j: j.order):
        hosts.setdefault(job.client.host, {}).setdefault(job.client.peer, []).append(job)
    per_host = [list(_interleave(list(peers.values()), turn)) for peers in hosts.values()]
    yield from _interleave(per_host, turn)


def _interleave(queues: list[list[SpanJob]], turn: int) -> Iterator[SpanJob]:
    """One item of each queue per round, the queue that goes first rotating with ``turn``."""
    if not queues:
        return
    shift = turn % len(queues)
    for layer in itertools.zip_longest(*queues[shift:], *queues[:shift]):
        yield from (job for job in layer if job is not None)


def plan_batch(
    jobs: Sequence[SpanJob],
    *,
    max_batch_tokens: int,
    chunk_tokens: int,
    turn: int,
    shared_batch: int | None = None,
    forward_patience: int,
    batching: bool = True,
) -> Batch | None:
    """The next batch (see `swarm.server.compute` for the rules), or None without jobs.

    ``shared_batch``: while decode steps of more than one client wait, at most this many of
    them (`decode_cap`), taken round robin over hosts and their peers. Without
    ``batching`` the batch is one job's next chunk: the oldest of the highest priority,
    decode steps first.
    """
    live = [job for job in jobs if not job.cancelled and not job.finished]
    if not live:
        return None
    if not batching:
        job = min(live, key=lambda j: (j.priority, not j.is_decode, j.order))
        return Batch((_chunk(job, chunk_tokens),))
    slices: list[Slice] = []
    tokens = 0
    decode = [j for j in live if j.is_decode]
    most = decode_cap(decode, shared_batch) or len(decode)
    for job in round_robin(decode, turn):
        if len(slices) >= most:
            break
        if tokens + job.rows <= max_batch_tokens or not slices:
            slices.append(Slice(job, 0, 1))
            tokens += job.rows
    bulk = [job for job in live if not job.is_decode]
    if bulk:
        slices.extend(_bulk_slices(bulk, chunk_tokens, turn, forward_patience))
    chosen = {id(s.job) for s in slices}
    for job in bulk:
        job.passed_over = 0 if id(job) in chosen else job.passed_over + 1
    return Batch(tuple(slices))


def decode_cap(decode: Sequence[SpanJob], shared_batch: int | None) -> int | None:
    """At most how many of the ready ``decode`` steps one batch takes (besides its token
    limit): None (all of them) unless steps of more than one client wait and
    ``shared_batch`` is set; then that many, or a step for each waiting client if that is
    more, where the peers at one address count as one client while other addresses wait
    (so made-up identities neither grow the batches nor the rounds of round robin)."""
    peers = {job.client for job in decode}
    if shared_batch is None or len(peers) <= 1:
        return None
    hosts = {client.host for client in peers}
    return max(shared_batch, len(hosts) if len(hosts) > 1 else len(peers))


def _bulk_slices(bulk: list[SpanJob], chunk_tokens: int, turn: int, patience: int) -> list[Slice]:
    """Chunks of bulk jobs within ``chunk_tokens``: overdue forwards first, then inference
    before forwards, round robin over clients within each class; at least one chunk."""
    overdue = [j for j in bulk if j.priority == Priority.FORWARD and j.passed_over >= patience]
    rest = [j for j in bulk if j not in overdue]
    ordered = list(round_robin(overdue, turn))
    for priority in Priority:
        ordered.extend(round_robin((j for j in rest if j.priority == priority), turn))
    slices: list[Slice] = []
    budget = chunk_tokens
    for job in ordered:
        if slices and budget < job.rows:
            break
        piece = _chunk(job, max(budget, job.rows))
        slices.append(piece)
        budget -= (piece.stop - piece.start) * job.rows
        if budget <= 0:
            break
    return slices


def _chunk(job: SpanJob, tokens: int) -> Slice:
    """The job's next chunk of at most ``tokens`` tokens (at least one per row)."""
    steps = min(job.seq - job.offset, max(1, tokens // job.rows))
    return Slice(job, job.offset, job.offset + steps)


def run_batch(batch: Batch) -> None:
    """Worker-thread body: run every slice (one `Span.forward_batch` per layer range),
    store each chunk's output in its job and advance it. A failure is the failing job's
    alone: the group is re-run job by job (no cache advanced before the failure), and only
    the job that fails again gets the error."""
    groups: dict[LayerRange, list[Slice]] = {}
    for piece in batch.slices:
        groups.setdefault(piece.job.span.layers, []).append(piece)
    for pieces in groups.values():
        try:
            _run_group(pieces)
        except Exception as exc:
            if len(pieces) == 1:
                pieces[0].job.error = exc
                continue
            for piece in pieces:
                try:
                    _run_group([piece])
                except Exception as exc:  # delivered to that job's submitter
                    piece.job.error = exc


def _run_group(pieces: list[Slice]) -> None:
    span = pieces[0].job.span
    device, dtype = span.device, span.dtype
    items = [
        BatchItem(
            p.job.hidden[:, p.start : p.stop].to(device, dtype),  # (rows, chunk, hidden)
            p.job.positions[:, p.start : p.stop].to(device),  # (rows, chunk)
            p.job.cache,
        )
        for p in pieces
    ]
    with torch.inference_mode():  # cheaper than no_grad: no version counters, no views tracked
        if len(items) == 1:  # a lone step: the plain forward skips the ragged bookkeeping
            only = items[0]
            outs = [span(only.hidden, only.positions, only.cache)]
        else:
            outs = span.forward_batch(items)
    for piece, out in zip(pieces, outs, strict=True):
        piece.job.outputs.append(out.cpu())  # (rows, chunk, hidden)
        piece.job.offset = piece.stop
