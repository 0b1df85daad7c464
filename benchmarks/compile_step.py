"""Does ``torch.compile`` shorten a decode step on the CPU? (issue 24: the ~60 eager
dispatches a layer that are not matmuls.)

    python benchmarks/compile_step.py --mode mlp     # each block's MLP compiled
    python benchmarks/compile_step.py --mode block   # each whole block, dynamic shapes

The default model's 30 layers in the file's own int4, one thread: the median CPU time of a
one-token step after a 40-token prompt (24 steps), eager then compiled, the compile time
(the first 3 compiled steps), and the largest difference of the outputs. Not a test.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch._dynamo

from swarm import shards
from swarm.shards import bundled
from swarm.types import LayerRange


def steps(head: shards.Head, span: shards.Span, count: int, label: str) -> list[torch.Tensor]:
    cache = shards.KVCache.allocate(span.config, span.layers, 1, 128)
    outs, times = [], []
    with torch.inference_mode():
        span(head.embed(torch.arange(40)[None] + 100), torch.arange(40)[None], cache)
        for i in range(count):
            x = head.embed(torch.tensor([[200 + i]]))  # (1, 1, hidden)
            started = time.process_time()
            outs.append(span(x, torch.tensor([[40 + i]]), cache))
            times.append(time.process_time() - started)
    times.sort()
    print(f"{label}: median {1e3 * times[len(times) // 2]:.2f} ms CPU", flush=True)
    return outs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("mlp", "block"), default="mlp")
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = str(bundled.default_model_path())
    head = shards.load_head(path)
    span = shards.load_span(path, LayerRange(0, head.config.num_hidden_layers), quant=None)
    eager = steps(head, span, 24, "eager")
    torch._dynamo.config.cache_size_limit = 64  # one compiled graph per block
    started = time.perf_counter()
    for block in span.blocks:
        if args.mode == "mlp":
            block.mlp.forward = torch.compile(block.mlp.forward, dynamic=False)
        else:
            block.forward = torch.compile(block.forward, dynamic=True)
    steps(head, span, 3, "first compiled steps")
    print(f"compile: {time.perf_counter() - started:.1f} s wall", flush=True)
    compiled = steps(head, span, 24, f"compiled ({args.mode})")
    diff = max((a - b).abs().max().item() for a, b in zip(eager, compiled, strict=True))
    print(f"largest difference of the outputs: {diff:.3g}")


if __name__ == "__main__":
    main()
