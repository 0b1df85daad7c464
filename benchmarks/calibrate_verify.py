"""Calibrate the hidden-state comparison of `swarm.verify.compare`.

Measures, on tiny random Llamas (several seeds and depths), the worst per-position
discrepancy between honest computations of the same span on the same inputs:

- float32 decoding step by step with a KV cache vs one forward of the whole history
  (what a spot-check compares), and a prefill split in chunks vs in one piece;
- float32 vs bfloat16 (one peer per dtype);
- bfloat16 step by step vs bfloat16 whole history.

Then the smallest relative noise ``r`` (as `swarm.testing.adversaries` adds it) that the
committed thresholds catch in every trial, per dtype pair. Prints a table; exits 1 if an
honest discrepancy fails the committed thresholds.

    python benchmarks/calibrate_verify.py [--seeds 3] [--steps 24]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from swarm.shards import load_head, load_span
from swarm.shards.span import Span
from swarm.testing.adversaries import corruptor
from swarm.testing.checkpoints import make_tiny_checkpoint
from swarm.testing.simulate import record_outputs
from swarm.types import LayerRange
from swarm.verify.compare import compare, position_errors, thresholds_for

PROMPT = 8
NOISE_GRID = [3e-4, 5e-4, 1e-3, 1.5e-3, 2e-3, 3e-3, 5e-3, 1e-2, 2e-2, 4e-2, 6e-2, 8e-2, 0.1, 0.12]


def stepwise(span: Span, x: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Run ``x`` (1, seq, hidden) through ``span`` in chunks with a KV cache."""
    return torch.cat(record_outputs(span, x, chunks).steps, dim=1)  # (1, seq, hidden)


def worst(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    rel, cos = position_errors(a, b)
    return float(rel.max()), float(cos.min())


Tensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def measure(
    path: Path, steps: int, seed: int
) -> tuple[dict[str, list[tuple[float, float]]], Tensors]:
    """Honest discrepancies of one checkpoint, and its (whole f32, whole bf16, step f32,
    step bf16) outputs."""
    config = json.loads((path / "config.json").read_text())
    layers = LayerRange(0, int(config["num_hidden_layers"]))
    head = load_head(path)
    f32 = load_span(path, layers)
    b16 = load_span(path, layers, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (1, PROMPT + steps), generator=gen)  # (1, seq)
    with torch.no_grad():
        x = head.embed(ids).float()  # (1, seq, hidden)
    decode = [PROMPT] + [1] * steps
    rec32, rec16 = record_outputs(f32, x, decode), record_outputs(b16, x, decode)
    ref32, ref16 = rec32.whole, rec16.whole  # (1, seq, hidden) each: one forward of everything
    step32, step16 = torch.cat(rec32.steps, dim=1), torch.cat(rec16.steps, dim=1)
    rows = {
        "f32 step vs f32 whole": [worst(ref32, step32)],
        "f32 split prefill vs whole": [worst(ref32, stepwise(f32, x, [3, 5] + [1] * steps))],
        "f32 vs bf16": [worst(ref32, ref16), worst(ref32, step16)],
        "bf16 step vs bf16 whole": [worst(ref16, step16)],
    }
    return rows, (ref32, ref16, step32, step16)


def smallest_caught(pairs: list[tuple[torch.Tensor, torch.Tensor, str, str]]) -> float | None:
    """Smallest r in the grid that every (checker, liar-base) pair catches at its last step."""
    for r in NOISE_GRID:
        caught = True
        for trial, (checker, base, da, db) in enumerate(pairs):
            noisy = corruptor(f"noise:{r}", seed=trial)(base, base[:, -1:])  # the step's output
            verdict = compare(checker[:, -1:], noisy, thresholds_for(da, db))
            caught &= not verdict.ok
        if caught:
            return r
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows: dict[str, list[tuple[float, float]]] = {}
    pairs32: list[tuple[torch.Tensor, torch.Tensor, str, str]] = []
    pairs_mixed: list[tuple[torch.Tensor, torch.Tensor, str, str]] = []
    pairs16: list[tuple[torch.Tensor, torch.Tensor, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for depth in (4, 12):
                path = make_tiny_checkpoint(
                    Path(tmp) / f"m{seed}-{depth}", num_layers=depth, seed=seed
                )
                got, (ref32, ref16, step32, step16) = measure(path, args.steps, seed)
                for key, values in got.items():
                    rows.setdefault(key, []).extend(values)
                pairs32.append((ref32, step32, "float32", "float32"))
                pairs_mixed.append((ref32, step16, "float32", "bfloat16"))
                pairs16.append((ref16, step16, "bfloat16", "bfloat16"))
    failed = False
    print(f"{'honest pair':30} {'max rel L2':>12} {'min cosine':>12} {'threshold':>18} pass")
    for key, values in rows.items():
        rel = max(v[0] for v in values)
        cos = min(v[1] for v in values)
        th = (
            thresholds_for("float32", "float32")
            if "bf16" not in key
            else thresholds_for("float32", "bfloat16")
        )
        ok = rel <= th.max_rel_l2 and cos >= th.min_cosine
        failed |= not ok
        print(f"{key:30} {rel:12.3e} {cos:12.8f} {th.max_rel_l2:8g}/{th.min_cosine:<9g} {ok}")
    print()
    print(f"{'dtype pair':30} {'smallest noise r caught in every trial':>40}")
    for name, pairs in (
        ("float32 / float32", pairs32),
        ("float32 / bfloat16", pairs_mixed),
        ("bfloat16 / bfloat16", pairs16),
    ):
        print(f"{name:30} {smallest_caught(pairs)!s:>40}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
