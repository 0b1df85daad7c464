"""A/B of one decode step (one thread) between another commit's swarm and this tree's, both
loaded in this process and alternated (issue 24): by default the default model's 30 layers
in the file's own int4; ``--model tiny`` is benchmarks/generate.py's tiny model (8 layers,
hidden 256, written once under ``--workdir``), ``--quant`` none|int8|int4 requantizes:

    git archive COMMIT swarm | tar -x -C /tmp/base   # the other commit's source tree
    python benchmarks/ab_decode_step.py --base /tmp/base [--rounds 15] [--model tiny]
        [--quant none]

Each round runs 8 steps of each (one new token after a 40-token prompt, with the float head
between steps as in decoding, untimed) and records wall and CPU time (this thread's: on a
shared machine it moves less with the other processes); medians and 10th percentiles, and
whether both trees' outputs are bit for bit equal.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

HERE = Path(__file__).resolve().parent.parent


TINY = {"num_layers": 8, "hidden": 256, "heads": 8, "kv_heads": 8, "intermediate": 688}


def _load(root: Path, model: Path | None, quant: str | None) -> tuple[ModuleType, Any, Any]:
    """Import ``swarm`` from ``root`` afresh; return swarm.shards, the head and the span of
    ``model`` (None: the default model) in ``quant`` (None: the file's own)."""
    for name in [n for n in sys.modules if n == "swarm" or n.startswith("swarm.")]:
        del sys.modules[name]
    sys.path.insert(0, str(root))
    try:
        shards = importlib.import_module("swarm.shards")
        bundled = importlib.import_module("swarm.shards.bundled")
        types = importlib.import_module("swarm.types")
    finally:
        sys.path.remove(str(root))
    path = str(bundled.default_model_path() if model is None else model)
    head = shards.load_head(path)
    layers = types.LayerRange(0, head.config.num_hidden_layers)
    kind = None if quant is None else shards.Quantization(quant)
    span = shards.load_span(path, layers, quant=kind)
    return shards, head, span


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="the other commit's tree")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--model", choices=["default", "tiny"], default="default")
    parser.add_argument("--quant", choices=["none", "int8", "int4"], default=None)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/swarm-ab-decode"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = None
    if args.model == "tiny":
        model = args.workdir / "tiny"
        if not (model / "config.json").exists():
            from swarm.lab.checkpoints import write_random_llama

            write_random_llama(model, seed=0, std=0.02, vocab=32000, **TINY)
    trees = {"base": _load(args.base, model, args.quant), "this": _load(HERE, model, args.quant)}
    wall: dict[str, list[float]] = {n: [] for n in trees}
    cpu: dict[str, list[float]] = {n: [] for n in trees}
    outs: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        caches = {}
        for name, (shards, head, span) in trees.items():
            cache = shards.KVCache.allocate(span.config, span.layers, 1, 64)
            span(head.embed(torch.arange(40)[None] + 100), torch.arange(40)[None], cache)
            caches[name] = cache
        for _ in range(args.rounds):
            for name, (_, head, span) in trees.items():
                for i in range(8):
                    caches[name].truncate(40)
                    x = head.embed(torch.tensor([[5 + i]]))
                    head.logits(x)  # the head between steps, as decoding runs it
                    began, cpu_began = time.perf_counter(), time.thread_time()
                    outs[name] = span(x, torch.tensor([[40]]), caches[name])
                    wall[name].append(time.perf_counter() - began)
                    cpu[name].append(time.thread_time() - cpu_began)
    for name in trees:
        w, c = sorted(wall[name]), sorted(cpu[name])
        print(f"{name}: CPU median {statistics.median(c) * 1e3:.2f} ms, p10 "
              f"{c[len(c) // 10] * 1e3:.2f} ms; wall median {statistics.median(w) * 1e3:.2f} "
              f"ms, p10 {w[len(w) // 10] * 1e3:.2f} ms")  # fmt: skip
    b, t = sorted(cpu["base"]), sorted(cpu["this"])
    print(f"this / base, CPU time: median {statistics.median(t) / statistics.median(b):.3f}, "
          f"p10 {t[len(t) // 10] / b[len(b) // 10]:.3f}; outputs bit for bit equal: "
          f"{torch.equal(outs['base'], outs['this'])}")  # fmt: skip


if __name__ == "__main__":
    main()
