"""Calibrate hidden-state comparison between peers of different quantizations.

The same span of a float32 checkpoint served three ways, none (float32), int8 (per channel)
and int4 (group 32), all in float32 activations: the worst per-position discrepancy between
honest peers of each pair (one forward of the whole history against decoding step by step,
as a spot-check compares), on tiny random Llamas (hidden 64, 4 and 12 layers, several seeds)
and on the default model's first 10 layers (SmolLM2-135M: int8/int4 requantized from its
float32 dequantization). Then the smallest relative noise ``r`` the committed thresholds
(`swarm.verify.compare.thresholds_for`) catch in every trial. Exits 1 if an honest pair fails.

    python benchmarks/calibrate_quant.py [--seeds 3] [--steps 24]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from itertools import combinations
from pathlib import Path

import torch

from swarm.errors import ShardError
from swarm.shards import ModelConfig, Quantization, load_head, load_span
from swarm.shards.bundled import default_model_path
from swarm.testing.adversaries import corruptor
from swarm.testing.checkpoints import write_random_gguf
from swarm.testing.simulate import record_outputs
from swarm.types import LayerRange
from swarm.verify.compare import compare, position_errors, thresholds_for

PROMPT = 8
NOISE_GRID = [1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 4e-2, 6e-2, 8e-2, 0.1, 0.15, 0.2, 0.3, 0.5]
KINDS = (Quantization.NONE, Quantization.INT8, Quantization.INT4)


def label(kind: Quantization) -> str:
    return "float32" if kind is Quantization.NONE else f"float32+{kind.value}"


def outputs(
    path: Path, layers: LayerRange, steps: int, seed: int
) -> dict[Quantization, tuple[torch.Tensor, torch.Tensor]]:
    """Per quantization: (whole-history forward, step-by-step) outputs (1, seq, hidden)."""
    head = load_head(path)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (1, PROMPT + steps), generator=gen)
    with torch.no_grad():
        x = head.embed(ids).float()  # (1, seq, hidden)
    out = {}
    for kind in KINDS:
        # A float32 checkpoint: every quantization is a requantization (the worst case).
        rec = record_outputs(load_span(path, layers, quant=kind), x, [PROMPT] + [1] * steps)
        out[kind] = (rec.whole, torch.cat(rec.steps, dim=1))
    return out


def smallest_caught(pairs: list[tuple[torch.Tensor, torch.Tensor, str, str]]) -> float | None:
    for r in NOISE_GRID:
        if all(
            not compare(
                checker[:, -1:],
                corruptor(f"noise:{r}", seed=i)(base, base[:, -1:]),
                thresholds_for(a, b),
            ).ok
            for i, (checker, base, a, b) in enumerate(pairs)
        ):
            return r
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args()
    torch.set_num_threads(1)
    worst: dict[tuple[str, str], tuple[float, float]] = {}
    liars: dict[tuple[str, str], list[tuple[torch.Tensor, torch.Tensor, str, str]]] = {}
    models: list[tuple[Path, LayerRange, int]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for depth in (4, 12):
                path = write_random_gguf(Path(tmp) / f"m{seed}-{depth}.gguf", num_layers=depth,
                                         seed=seed)  # fmt: skip
                models.append((path, LayerRange(0, depth), seed))
        try:
            smol = default_model_path()
            ModelConfig.from_pretrained(smol)
            models.append((smol, LayerRange(0, 10), 0))
        except ShardError:
            print("(the default model is not installed: random models only)")
        for path, layers, seed in models:
            out = outputs(path, layers, args.steps, seed)
            for a, b in [*combinations(KINDS, 2), *((k, k) for k in KINDS)]:
                key = (label(a), label(b))
                rel, cos = position_errors(out[a][0], out[b][1])  # checker whole, peer stepwise
                old = worst.get(key, (0.0, 1.0))
                worst[key] = (max(old[0], float(rel.max())), min(old[1], float(cos.min())))
                liars.setdefault(key, []).append((out[a][0], out[b][1], *key))
    failed = False
    print(f"{'honest pair':32} {'max rel L2':>11} {'min cosine':>11} {'threshold':>16} pass "
          f"{'smallest noise caught':>22}")  # fmt: skip
    for key, (rel, cos) in worst.items():
        th = thresholds_for(*key)
        ok = rel <= th.max_rel_l2 and cos >= th.min_cosine
        failed |= not ok
        print(f"{' / '.join(key):32} {rel:11.3e} {cos:11.6f} {th.max_rel_l2:7g}/{th.min_cosine:<8g}"
              f" {ok!s:5} {smallest_caught(liars[key])!s:>22}")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
