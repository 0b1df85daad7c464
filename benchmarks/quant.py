"""Weights kept quantized: latency, memory, load time and error of float32, bfloat16, int8 and
int4 spans of the default model (SmolLM2-135M-Instruct, its Q4_1 GGUF file).

Per serving mode, in one process, one thread, modes interleaved round by round so a loaded
machine skews them alike:

- ``load s``: ``load_span`` of layers 0:10;
- ``span ms``: one decode step (1 token, KV cache of ``--context`` tokens) through 0:10;
- ``chain ms``: one decode step through the whole model as three spans 0:10 / 10:20 / 20:30
  plus the float32 head (what a 3-hop swarm computes per token, without the network);
- ``greedy ms``: the same with the head a client decodes greedily with by default (the float
  head's greedy screen, `swarm.shards.screen`: the same token);
- ``batch8 ms``: one decode step of 8 sessions batched (`Span.forward_batch`) through 0:10;
- ``prefill ms``: a 128-token stateless forward through 0:10;
- ``MiB``: resident anonymous memory (RssAnon) the 0:10 range added, after ``malloc_trim``;
- ``logits err``: relative L2 of the chain's last logits against float32's, and whether the
  greedy token agrees.

    python benchmarks/quant.py [--rounds 5] [--context 64]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import time
from collections.abc import Callable

import torch

from swarm.shards import Head, KVCache, Quantization, load_head, load_span
from swarm.shards.bundled import default_model_path
from swarm.shards.span import BatchItem, Span
from swarm.types import LayerRange

MODES: dict[str, tuple[torch.dtype, Quantization]] = {
    "float32": (torch.float32, Quantization.NONE),
    "bfloat16": (torch.bfloat16, Quantization.NONE),
    "int8": (torch.float32, Quantization.INT8),
    "int4": (torch.float32, Quantization.INT4),
}
RANGES = [LayerRange(0, 10), LayerRange(10, 20), LayerRange(20, 30)]


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def trimmed() -> int:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_anon()


def timed(fn: Callable[[], object], repeat: int) -> float:
    fn()
    began = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - began) / repeat * 1e3


def time_step(
    head: Head, screened: Head, chain: list[Span], x: torch.Tensor, context: int
) -> dict[str, float]:
    """Milliseconds of one decode step through the first span and the chain (the same step
    again each time, the cache kept at ``context`` tokens; with the float head, then with
    the ``screened`` one's greedy logits), 8 batched sessions, a prefill."""
    dtype = chain[0].dtype
    caches = [KVCache.allocate(s.config, s.layers, 1, context + 8, dtype) for s in chain]
    positions = torch.arange(context)[None]
    for span, cache in zip(chain, caches, strict=True):
        span(x.to(dtype), positions, cache)
    step, where = x[:, -1:].to(dtype), torch.tensor([[context]])

    def one_span() -> None:
        chain[0](step, where, caches[0])
        caches[0].length -= 1

    def whole(logits: Callable[[torch.Tensor], torch.Tensor]) -> None:
        h = step
        for span, cache in zip(chain, caches, strict=True):
            h = span(h, where, cache)
            cache.length -= 1
        logits(h.float())

    items = [BatchItem(step, where) for _ in range(8)]
    prefill = x[:, :1].expand(1, 128, -1).to(dtype).contiguous()
    long = torch.arange(128)[None]
    return {
        "span ms": timed(one_span, 5),
        "chain ms": timed(lambda: whole(head.logits), 3),
        "greedy ms": timed(lambda: whole(screened.greedy_logits), 3),
        "batch8 ms": timed(lambda: chain[0].forward_batch(items), 3),
        "prefill ms": timed(lambda: chain[0](prefill, long), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--context", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = default_model_path()
    head = load_head(path)
    screened = load_head(path, screen=True)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (1, args.context), generator=gen)
    spans: dict[str, list[Span]] = {}
    figures: dict[str, dict[str, list[float]]] = {m: {} for m in MODES}
    for mode, (dtype, quant) in MODES.items():
        before = trimmed()
        began = time.perf_counter()
        first = load_span(path, RANGES[0], dtype=dtype, quant=quant)
        figures[mode]["load s"] = [time.perf_counter() - began]
        figures[mode]["MiB"] = [(trimmed() - before) / 2**20]
        spans[mode] = [first, *(load_span(path, r, dtype=dtype, quant=quant) for r in RANGES[1:])]
    with torch.inference_mode():
        x = head.embed(ids)  # (1, context, hidden)
        positions = torch.arange(args.context)[None]
        logits = {}
        for mode, chain in spans.items():
            h = x.to(chain[0].dtype)
            for span in chain:
                h = span(h, positions)
            logits[mode] = head.logits(h[:, -1:].float())[0, -1]
        for _ in range(args.rounds):
            for mode, chain in spans.items():
                for name, ms in time_step(head, screened, chain, x, args.context).items():
                    figures[mode].setdefault(name, []).append(ms)
    base = logits["float32"]
    print(f"SmolLM2-135M Q4_1 GGUF, 1 thread, context {args.context}, {args.rounds} rounds "
          "(median)")  # fmt: skip
    columns = ["load s", "MiB", "span ms", "chain ms", "greedy ms", "batch8 ms", "prefill ms"]
    print(f"{'mode':9}" + "".join(f"{c:>12}" for c in columns) + f"{'logits err':>12} same")
    for mode in MODES:
        row = [statistics.median(figures[mode][c]) for c in columns]
        err = float((logits[mode] - base).norm() / base.norm())
        same = int(logits[mode].argmax()) == int(base.argmax())
        print(f"{mode:9}" + "".join(f"{v:12.2f}" for v in row) + f"{err:12.2e} {same}")
    f32 = {c: statistics.median(figures["float32"][c]) for c in columns}
    for mode in ("int8", "int4"):
        ratios = {
            c: statistics.median(figures[mode][c]) / f32[c]
            for c in ("MiB", "chain ms", "greedy ms")
        }
        print(f"{mode} / float32: memory {ratios['MiB']:.2f}x, chain step "
              f"{ratios['chain ms']:.2f}x (greedy head {ratios['greedy ms']:.2f}x)")  # fmt: skip
    g = statistics.median(figures["float32"]["greedy ms"]) / f32["chain ms"]
    print(f"float32, greedy head / float head: chain step {g:.2f}x")


if __name__ == "__main__":
    main()
