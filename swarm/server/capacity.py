"""Sizing a server from its hardware: blocks and KV cache from free memory, batch timings.

`plan_capacity` turns free memory (`available_memory`: CUDA's free memory on a GPU, psutil's
available RAM on the CPU) into how many blocks to serve and how many cache tokens to offer.
`measure_span` times the span at the batch sizes the compute worker runs (decode steps of
1..16 sessions batched, prompt chunks of 16..1024 tokens); the announcement's throughput,
the default prefill chunk and the estimate of a forward's time come from it.
`estimate_span` is the cheap first estimate a server goes online on before that: one layer
timed and scaled, erring slow.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path

import psutil
import torch

from swarm.errors import ConfigError
from swarm.shards.blocks import Block
from swarm.shards.cache import KVCache
from swarm.shards.config import ModelConfig
from swarm.shards.quant import GROUP, Quantization
from swarm.shards.span import BatchItem, Span
from swarm.types import LayerRange

__all__ = [
    "Capacity",
    "MemoryPlan",
    "SpanMeasurement",
    "SpanTimings",
    "available_memory",
    "block_bytes",
    "cpu_has_native_bfloat16",
    "estimate_span",
    "kv_bytes_per_token",
    "measure_span",
    "plan_capacity",
]

MiB = 1024 * 1024


@functools.cache
def cpu_has_native_bfloat16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX-512 BF16 or AMX), read from
    Linux's ``cpuinfo`` flags; False where that cannot be read."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return False
    flags = {
        flag
        for line in text.splitlines()
        if line.startswith("flags")
        for flag in line.partition(":")[2].split()
    }
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def available_memory(device: torch.device) -> int:
    """Bytes free for this server: CUDA's free memory on ``device``, or the available RAM."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return int(psutil.virtual_memory().available)


@dataclass(frozen=True)
class MemoryPlan:
    """How free memory is shared out.

    - ``usable_fraction`` (0.9): the share of free memory the server plans for; the rest is
      left for activations, allocator slack and everything else on the machine.
    - ``cache_fraction`` (0.25): when both the block count and the cache are derived, the
      share of the usable memory kept for the KV cache.
    - ``max_cache_tokens`` (65,536): the most cache tokens a derived budget offers.
    """

    usable_fraction: float = 0.9
    cache_fraction: float = 0.25
    max_cache_tokens: int = 65536

    def __post_init__(self) -> None:
        if not 0 < self.usable_fraction <= 1 or not 0 <= self.cache_fraction < 1:
            raise ConfigError("MemoryPlan fractions must be in (0, 1] and [0, 1)")


@dataclass(frozen=True)
class Capacity:
    num_blocks: int
    cache_tokens: int


SCALE_BYTES = 4 + 2  # a quantized layer's scale (or zero): float32, and bfloat16 for the kernel


def block_bytes(
    config: ModelConfig, dtype: torch.dtype, quant: Quantization = Quantization.NONE
) -> int:
    """Bytes of one block's weights in ``dtype``, the projections kept as ``quant`` says
    (int8: a byte a weight and a scale a row; int4: half a byte a weight and a scale and a
    zero per group of 32; each scale in float32 and in the kernels' bfloat16)."""
    with torch.device("meta"):
        block = Block(config)
    itemsize = torch.empty((), dtype=dtype, device="meta").element_size()
    total = 0
    for name, p in block.named_parameters():
        rows, cols = (p.shape[0], p.shape[1]) if p.dim() == 2 else (0, 0)
        if quant is Quantization.INT8 and p.dim() == 2:
            total += rows * cols + rows * SCALE_BYTES
        elif quant is Quantization.INT4 and p.dim() == 2:
            total += rows * cols // 2 + rows * (cols // GROUP) * 2 * SCALE_BYTES
        else:
            total += p.numel() * itemsize
        del name
    return total


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of one cached token in one block (its key and value)."""
    itemsize = torch.empty((), dtype=dtype, device="meta").element_size()
    return 2 * config.num_key_value_heads * config.head_dim * itemsize


def plan_capacity(
    config: ModelConfig,
    dtype: torch.dtype,
    free_bytes: int,
    *,
    num_blocks: int | None,
    cache_tokens: int | None,
    plan: MemoryPlan | None = None,
    quant: Quantization = Quantization.NONE,
) -> Capacity:
    """Blocks and cache tokens that fit in ``free_bytes`` (None: derive it).

    Blocks, when derived: as many as fit with ``cache_tokens`` reserved for each (or, with
    the cache derived too, in ``1 - cache_fraction`` of the usable memory), at most the
    model's. Cache tokens, when derived: what the memory left after the blocks holds, at
    most ``max_cache_tokens``.

    Raises:
        ConfigError: not even one block (with its cache) fits.
    """
    plan = plan or MemoryPlan()
    usable = free_bytes * plan.usable_fraction
    weights, per_token = block_bytes(config, dtype, quant), kv_bytes_per_token(config, dtype)
    blocks = num_blocks
    if blocks is None:
        if cache_tokens is not None:
            blocks = math.floor(usable / (weights + cache_tokens * per_token))
        else:
            blocks = math.floor(usable * (1 - plan.cache_fraction) / weights)
        blocks = min(blocks, config.num_hidden_layers)
    tokens = cache_tokens
    if tokens is None and blocks >= 1:
        left = usable - blocks * weights
        tokens = min(plan.max_cache_tokens, math.floor(left / (blocks * per_token)))
    if blocks < 1 or tokens is None or tokens < 1:
        raise ConfigError(
            f"{free_bytes / MiB:.0f} MiB free does not hold one block ({weights / MiB:.1f} "
            f"MiB) and its KV cache; free memory, or give --num-blocks / --cache-tokens"
        )
    return Capacity(blocks, tokens)


@dataclass(frozen=True)
class SpanTimings:
    """Measured seconds of one decode step at each batch size (sessions batched) and of
    one stateless forward of each chunk size (tokens), both ascending."""

    decode: tuple[tuple[int, float], ...]
    chunks: tuple[tuple[int, float], ...]
    flops_per_token: float  # linear layers: 2 × parameters
    flops_per_pair: float  # attention, per (query, key) pair: 4 × heads × head_dim × layers

    def step_seconds(self, batch: int) -> float:
        """Seconds of one batched decode step of ``batch`` sessions (linear between the
        measured sizes, and beyond the last two)."""
        points = self.decode
        if len(points) == 1 or batch <= points[0][0]:
            return points[0][1]
        pairs = list(pairwise(points))
        (b0, t0), (b1, t1) = next((p for p in pairs if batch <= p[1][0]), pairs[-1])
        return max(t0 + (t1 - t0) * (batch - b0) / (b1 - b0), points[0][1])

    def throughput(self, batch: int = 1) -> float:
        """Tokens per second one session gets while ``batch`` sessions decode together."""
        return 1.0 / max(self.step_seconds(batch), 1e-9)

    def batch_within(self, factor: float) -> int:
        """The largest batch of decode steps whose (interpolated) step time is at most
        ``factor`` × a single step's (at least 1, at most 4 × the largest measured)."""
        single, largest = self.decode[0][1], self.decode[-1][0]
        fitting = [b for b in range(1, 4 * largest + 1) if self.step_seconds(b) <= factor * single]
        return max([1, *fitting])

    def prefill_chunk(self, factor: float = 1.5, minimum: int = 16) -> int:
        """The largest measured chunk whose forward takes at most ``factor`` × one
        single-session decode step (at least ``minimum`` tokens): a batch of decode steps
        that carries a chunk then costs them about that much more at most."""
        limit = factor * self.decode[0][1]
        fitting = [tokens for tokens, seconds in self.chunks if seconds <= limit]
        return max([minimum, *fitting])

    def forward_seconds(self, rows: int, seq: int) -> float:
        """Estimated compute seconds of a forward of ``rows`` × ``seq`` tokens: its FLOPs
        (linear layers ``flops_per_token`` × n, causal attention ``flops_per_pair`` × n²/2)
        at the best FLOP rate the measured chunks reached."""
        rate = max(self.flops_per_token * n / max(t, 1e-9) for n, t in self.chunks)
        flops = self.flops_per_token * seq + self.flops_per_pair * seq * seq / 2
        return rows * flops / rate


def _best_seconds(run: Callable[[], object], device: torch.device, repeats: int) -> float:
    """The fastest of ``repeats`` runs after a warm-up (other load only adds time)."""
    timings = []
    for _ in range(repeats + 1):  # the first is a warm-up
        started = time.perf_counter()
        run()
        _synchronize(device)
        timings.append(time.perf_counter() - started)
    return min(timings[1:])


def measure_span(
    span: Span,
    *,
    batch_sizes: Sequence[int] = (1, 2, 4, 8, 16),
    chunks: Sequence[int] = (16, 32, 64, 128, 256, 512, 1024),
    prefix: int = 32,
    repeats: int = 5,
) -> SpanTimings:
    """Time ``span`` (worker thread): batched decode steps of each batch size with
    ``prefix`` tokens cached per session, and stateless forwards of each chunk size until
    one takes over 4 × a single decode step. Costs a few hundred steps' compute; see
    `SpanMeasurement` for the same cut into short jobs."""
    measurement = SpanMeasurement(span, batch_sizes, chunks, prefix, repeats)
    for job in measurement.jobs():
        job()
    return measurement.result()


ESTIMATE_MARGIN = 2.0  # a first estimate announces 1/this of what one layer scales to


def estimate_span(span: Span, *, margin: float = ESTIMATE_MARGIN, repeats: int = 5) -> SpanTimings:
    """A first estimate of ``span``'s timings (worker thread): its first layer alone
    (`Span.narrow`, the same weights) timed as ``measure_span(batch_sizes=(1,),
    chunks=(16,), repeats=repeats)`` would time the span (the fastest of ``repeats`` after a
    warm-up: a scaled time multiplies whatever a busy machine added to it, so one sample is
    not enough), every time scaled by the span's layer count and by ``margin``. Costs about
    a 32-token prefill and 2 × ``repeats`` single steps of one layer.

    It errs slow on purpose: an announced throughput above what the server delivers would
    draw clients' routes (their cost is blocks / throughput) to it until the full
    measurement replaces it; one below only leaves it less used meanwhile. The layers are
    alike, so the scaled layer is close to the span (it also counts the per-step work once
    per layer, not once per span); ``margin`` 2 announces about half of that, as the cold
    timing of the whole span that came before this did (0.58x of the full measurement on
    the heavy model).
    """
    if margin < 1:
        raise ValueError(f"an estimate's margin must be at least 1, got {margin}")
    first = span.layers.start
    one = measure_span(
        span.narrow(LayerRange(first, first + 1)), batch_sizes=(1,), chunks=(16,), repeats=repeats
    )
    layers = len(span.layers)
    scale = margin * layers
    return replace(
        one,
        decode=tuple((batch, seconds * scale) for batch, seconds in one.decode),
        chunks=tuple((tokens, seconds * scale) for tokens, seconds in one.chunks),
        flops_per_token=one.flops_per_token * layers,
        flops_per_pair=one.flops_per_pair * layers,
    )


class SpanMeasurement:
    """`measure_span` cut into short jobs (a prefill, one batched decode step, one chunk
    forward), so that a server already online can run them between
    its sessions' steps. Iterate `jobs` and run each job (on the worker thread) before
    asking for the next: later jobs depend on earlier results. Then `result`."""

    def __init__(
        self,
        span: Span,
        batch_sizes: Sequence[int] = (1, 2, 4, 8, 16),
        chunks: Sequence[int] = (16, 32, 64, 128, 256, 512, 1024),
        prefix: int = 32,
        repeats: int = 5,
    ) -> None:
        self.span, self.batch_sizes, self.chunks = span, tuple(batch_sizes), tuple(chunks)
        self.prefix, self.repeats = prefix, repeats
        self._rounds: list[list[float]] = []
        self._measured: list[tuple[int, float]] = []
        self._decode: list[tuple[int, float]] = []

    def jobs(self) -> Iterator[Callable[[], None]]:
        span = self.span
        config, device, dtype = span.config, span.device, span.dtype
        prefix = self.prefix
        one = torch.randn(1, 1, config.hidden_size).to(device, dtype)
        position = torch.tensor([[prefix]], device=device)
        groups: list[list[KVCache]] = []

        def prepare() -> None:
            prompt = torch.randn(1, prefix, config.hidden_size).to(device, dtype)
            template = KVCache.allocate(config, span.layers, 1, prefix + 1, dtype, device)
            with torch.inference_mode():
                span(prompt, torch.arange(prefix).view(1, -1).to(device), template)
            groups.extend([template.clone() for _ in range(b)] for b in self.batch_sizes)

        def decode(caches: list[KVCache], times: list[float]) -> None:
            with torch.inference_mode():
                started = time.perf_counter()
                span.forward_batch([BatchItem(one, position, c) for c in caches])
                _synchronize(device)
                times.append(time.perf_counter() - started)
                for cache in caches:
                    cache.truncate(prefix)  # the same step again next round

        yield prepare
        # the sizes take turns in each round, so a burst of other load on the machine hits a
        # round's sizes alike and their ratios stay true; one job per step keeps each short
        for round_ in range(self.repeats + 1):  # the first round is a warm-up
            times: list[float] = []
            for caches in groups:
                yield functools.partial(decode, caches, times)
            if round_:
                self._rounds.append(times)
        groups.clear()
        first = min(times[0] for times in self._rounds)
        self._decode = [
            (batch, first * statistics.median(times[i] / times[0] for times in self._rounds))
            for i, batch in enumerate(self.batch_sizes)
        ]
        for tokens in self.chunks:
            x = torch.randn(1, tokens, config.hidden_size).to(device, dtype)
            positions = torch.arange(tokens).view(1, -1).to(device)

            def chunk(
                tokens: int = tokens, x: torch.Tensor = x, p: torch.Tensor = positions
            ) -> None:
                with torch.inference_mode():
                    seconds = _best_seconds(lambda: span(x, p), device, self.repeats)
                self._measured.append((tokens, seconds))

            yield chunk
            if self._measured[-1][1] > 4 * self._decode[0][1]:
                break

    def result(self) -> SpanTimings:
        """The timings, once every job has run. Raises `RuntimeError` before."""
        if not self._decode:
            raise RuntimeError("SpanMeasurement.result() before its jobs ran")
        config = self.span.config
        params = sum(p.numel() for p in self.span.parameters())
        pair = 4 * config.num_attention_heads * config.head_dim * len(self.span.layers)
        return SpanTimings(tuple(self._decode), tuple(self._measured), 2.0 * params, float(pair))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def size_server(
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    *,
    layers: int | None,
    num_blocks: int | None,
    cache_tokens: int,
    derive_cache: bool,
    plan: MemoryPlan,
    quant: Quantization = Quantization.NONE,
) -> Capacity:
    """What a server serves: ``layers`` blocks if given (an explicit range), else
    ``num_blocks``, else as many as `available_memory` holds; ``cache_tokens``, or with
    ``derive_cache`` what the memory left holds. Reads free memory only when something is
    derived. Raises `ConfigError` as `plan_capacity`."""
    blocks = layers if layers is not None else num_blocks
    if blocks is not None and not derive_cache:
        return Capacity(blocks, cache_tokens)
    return plan_capacity(
        config,
        dtype,
        available_memory(device),
        num_blocks=blocks,
        cache_tokens=None if derive_cache else cache_tokens,
        plan=plan,
        quant=quant,
    )
