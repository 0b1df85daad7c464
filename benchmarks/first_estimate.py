"""A server's first throughput estimate: its cost and how far it is from the full measurement.

    python benchmarks/first_estimate.py --rounds 3

Loads the heavy model's layers 0:8 (as `startup.py`; one torch thread) and, round by round,
times the first estimate a server without kept timings goes online on (`estimate_span`: one
layer timed and scaled, erring slow), the one it took before (the whole span: a 32-token
prefill, two decode steps and two 16-token chunks, ``measure_span(batch_sizes=(1,),
chunks=(16,), repeats=1)``) and the full measurement the server runs once online
(`measure_span`); prints each estimate's wall and CPU seconds and its throughput over the
full measurement's (above 1: an overestimate, which would draw routes to a new server
until the full measurement replaces it). The first round's spans are cold (the weights'
first touch). Not a test.
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
from startup import model_path

from swarm.server.capacity import SpanTimings, estimate_span, measure_span
from swarm.shards.span import load_span
from swarm.types import LayerRange


def timed(run: Callable[[], SpanTimings]) -> tuple[SpanTimings, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    timings = run()
    return timings, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", default="0:8")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "swarm-bench")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start, stop = (int(x) for x in args.layers.split(":"))
    span = load_span(model_path("heavy", args.workdir), LayerRange(start, stop))
    kinds: dict[str, Callable[[], SpanTimings]] = {
        "one layer": lambda: estimate_span(span),
        "whole span": lambda: measure_span(span, batch_sizes=(1,), chunks=(16,), repeats=1),
    }
    rows: dict[str, list[tuple[float, float, float]]] = {name: [] for name in kinds}
    for i in range(args.rounds):
        order = list(kinds) if i % 2 == 0 else list(kinds)[::-1]
        got = {name: timed(kinds[name]) for name in order}
        full = measure_span(span).throughput(1)
        for name, (timings, wall, cpu) in got.items():
            rows[name].append((wall, cpu, timings.throughput(1) / full))
            print(
                f"round {i}: {name}: {wall:.3f} s ({cpu:.3f} CPU s), "
                f"{timings.throughput(1):.1f} tok/s = {timings.throughput(1) / full:.2f} x the "
                f"full measurement's {full:.1f}",
                flush=True,
            )
    print(f"load average {os.getloadavg()}")
    for name, values in rows.items():
        walls, cpus, ratios = zip(*values, strict=True)
        print(
            f"[first estimate {args.layers}] {name}: median {statistics.median(walls):.3f} s, "
            f"{statistics.median(cpus):.3f} CPU s; x full {min(ratios):.2f}-{max(ratios):.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
