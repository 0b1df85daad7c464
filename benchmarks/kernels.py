"""What one CPU thread's kernels cost: the facts behind batching's gain per dtype (issue 11).

    python benchmarks/kernels.py             # all three parts, about a minute
    python benchmarks/kernels.py --only linear

- ``linear``: ``F.linear`` over 24 weight matrices of 2816 x 1024 (the heavy model's MLP
  shape, ~280 MB in float32: more than any cache), 1/2/4/8/16 rows, float32 and bfloat16,
  median ms. Where 8 rows cost about what 1 does, a step is bound by reading the weights
  and batching pays; where they cost twice, compute bounds it.
- ``attention``: one query (16 heads of 64) against 40...2,000 keys in bfloat16: PyTorch's
  SDPA against `swarm.shards.blocks.decode_attention`, median us.
- ``quant``: one row through the default model's 30 layers' linears (SmolLM2-135M shapes:
  qkv 576 x 960, o 576 x 576, gate+up 576 x 3072, down 1536 x 576; 120 matrices, more than
  any cache) as float32 ``F.linear`` and as our `QuantLinear` in int8 and int4 (random
  weights, the kernels `swarm.shards.quant` calls), median ms per pass and multiply-adds per
  second; the same with one layer's four matrices in a loop (cache-resident), to tell the
  kernels' compute from reading the weights.
- ``span``: the heavy model's 8-layer span in bfloat16, median decode step at context 32
  and 2,000, 1 and 8 sessions (``forward_batch``). Runs on older commits too (with
  ``PYTHONPATH`` at a worktree of them) for before/after figures.

Not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import torch.nn.functional as F

from swarm.shards import KVCache, load_span
from swarm.shards.span import BatchItem, Span
from swarm.testing.checkpoints import write_random_llama
from swarm.types import LayerRange

HEAVY = {"num_layers": 8, "hidden": 1024, "heads": 16, "kv_heads": 16, "intermediate": 2816}


def median_seconds(repeats: int, run: Callable[..., object], *args: object) -> float:
    """Median wall time of ``run(*args)`` over ``repeats`` calls, after one warm-up."""
    run(*args)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run(*args)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _linears(x: torch.Tensor, weights: list[torch.Tensor]) -> None:
    for w in weights:
        F.linear(x, w)


def _decode_step(model: Span, one: torch.Tensor, caches: list[KVCache], context: int) -> None:
    position = torch.tensor([[context]])
    model.forward_batch([BatchItem(one, position, c) for c in caches])
    for cache in caches:
        cache.truncate(context)  # the same step again next time


def linear() -> None:
    print("F.linear over 24 matrices of 2816 x 1024, median ms (x 1 row)")
    for dtype in (torch.float32, torch.bfloat16):
        weights = [torch.randn(2816, 1024).to(dtype) for _ in range(24)]
        cells, one = [], 0.0
        for rows in (1, 2, 4, 8, 16):
            x = torch.randn(rows, 1024).to(dtype)
            ms = 1e3 * median_seconds(10, _linears, x, weights)
            one = one or ms
            cells.append(f"{rows} rows {ms:6.1f} ({ms / one:.2f}x)")
        print(f"  {str(dtype).removeprefix('torch.'):<9}", "  ".join(cells), flush=True)


SMOL_LINEARS = ((576, 960), (576, 576), (576, 3072), (1536, 576))  # (in, out) of one layer


def quant() -> None:
    from swarm.shards.quant import Quantization, quantize_linear  # newer than `span`'s code

    print("one row through SmolLM2's linears, median ms per pass (G multiply-adds / s)")
    macs = sum(i * o for i, o in SMOL_LINEARS)
    for layers in (30, 1):
        shapes = SMOL_LINEARS * layers
        floats = [torch.randn(o, i) / i**0.5 for i, o in shapes]
        cells = []
        for kind in ("float32", "int8", "int4"):
            if kind == "float32":
                run = [lambda x, w=w: F.linear(x, w) for w in floats]
            else:
                q = Quantization(kind)
                run = [quantize_linear(w, None, q, torch.float32) for w in floats]
            inputs = [torch.randn(1, i) for i, _ in shapes]
            seconds = median_seconds(20, _each, run, inputs)
            cells.append(f"{kind} {1e3 * seconds:6.2f} ({macs * layers / seconds / 1e9:4.1f})")
        print(f"  {layers:>2} layers ", "  ".join(cells), flush=True)


def _each(layers: list[Callable[[torch.Tensor], torch.Tensor]], inputs: list[torch.Tensor]) -> None:
    with torch.inference_mode():
        for layer, x in zip(layers, inputs, strict=True):
            layer(x)


def attention() -> None:
    from swarm.shards.blocks import decode_attention  # here: `--only span` runs on old code

    print("one bfloat16 query, 16 heads of 64: SDPA vs decode_attention, median us")
    for total in (40, 128, 512, 2000):
        q = torch.randn(1, 16, 1, 64).bfloat16()
        k, v = torch.randn(1, 16, total, 64).bfloat16(), torch.randn(1, 16, total, 64).bfloat16()
        sdpa = 1e6 * median_seconds(100, F.scaled_dot_product_attention, q, k, v)
        ours = 1e6 * median_seconds(100, decode_attention, q, k, v, None)
        print(
            f"  {total:>5} keys: SDPA {sdpa:7.0f}  decode_attention {ours:6.0f}  "
            f"({sdpa / ours:.1f}x)",
            flush=True,
        )


def span(workdir: Path) -> None:
    path = workdir / "heavy8"
    write_random_llama(path, seed=0, std=0.02, vocab=256, **HEAVY)  # type: ignore[arg-type]
    dtype = torch.bfloat16
    model = load_span(path, LayerRange(0, 8), dtype=dtype)
    print("heavy 8-layer span, bfloat16, median decode step ms")
    for context in (32, 2000):
        base = KVCache.allocate(model.config, model.layers, 1, context + 16, dtype)
        with torch.inference_mode():
            for start in range(0, context, 500):
                n = min(500, context - start)
                x = torch.randn(1, n, 1024).to(dtype)
                model(x, torch.arange(start, start + n).view(1, -1), base)
            one = torch.randn(1, 1, 1024).to(dtype)
            for sessions in (1, 8):
                caches = [base.clone() for _ in range(sessions)]
                ms = 1e3 * median_seconds(10, _decode_step, model, one, caches, context)
                print(f"  context {context:>5}, {sessions} sessions: {ms:6.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=("linear", "quant", "attention", "span"), default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.only in (None, "linear"):
        linear()
    if args.only in (None, "quant"):
        quant()
    if args.only in (None, "attention"):
        attention()
    if args.only in (None, "span"):
        with tempfile.TemporaryDirectory() as tmp:
            span(Path(tmp))


if __name__ == "__main__":
    main()
