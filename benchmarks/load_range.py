"""Time to load one layer range of the default model (SmolLM2-135M-Instruct's GGUF) per way
of keeping its weights (issue 21 item 5: layers 10:20 from the GGUF within 2 s).

    python benchmarks/load_range.py [--layers 10:20] [--rounds 3]

Each round loads the range in a fresh process (no page cache of tensors in Python, the file
itself warm in the OS cache after the first), one torch thread, and prints the median."""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

CHILD = """
import sys, time, torch
torch.set_num_threads(1)
from swarm.shards import load_span
from swarm.shards.bundled import default_model_path
from swarm.shards.quant import Quantization
from swarm.types import LayerRange
path = default_model_path()
start, stop = map(int, sys.argv[1].split(":"))
quant = None if sys.argv[2] == "file" else Quantization(sys.argv[2])
t = time.perf_counter()
load_span(path, LayerRange(start, stop), quant=quant)
print(time.perf_counter() - t)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="10:20")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"layers {args.layers}, median of {args.rounds} fresh processes")
    label = {"file": "as the file is (Q4_1 kept int4)", "none": "float32", "int8": "int8"}
    for kind in ("file", "none", "int8"):
        times = [_load_once(args.layers, kind) for _ in range(args.rounds)]
        each = ", ".join(f"{t:.2f}" for t in times)
        print(f"{label[kind]:>32}: {statistics.median(times):.2f} s  ({each})")


def _load_once(layers: str, kind: str) -> float:
    argv = [sys.executable, "-c", CHILD, layers, kind]
    return float(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)


if __name__ == "__main__":
    main()
