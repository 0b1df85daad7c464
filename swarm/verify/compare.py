"""Hidden-state comparison: is a peer's output the same computation as the checker's?

Two outputs of the same span for the same inputs are compared position by position (each
token's hidden vector on its own, so a lie at one position cannot hide in the average of a
long history): relative L2 error ``|a - b| / max(|a|, |b|)`` and cosine similarity, against
thresholds that depend on the pair of dtypes the two peers computed in. NaN or Inf in either
output always fails.

Calibrated thresholds (``python benchmarks/calibrate_verify.py``: tiny random Llamas, hidden
64, 4 and 12 layers, 3 seeds, 8-token prompt + 24 decoded tokens; step-by-step decoding with
a KV cache against one forward of the whole history, a prefill split in chunks, float32
against bfloat16). Worst honest discrepancy over every position, and the smallest noise of
relative size ``r`` that the threshold catches in every trial (grid 3e-4 .. 0.12):

=====================  ===================  ======================  =====================
dtype pair             honest worst         threshold               smallest noise caught
                       (rel L2 / cosine)    (max rel L2 / min cos)  (relative size r)
=====================  ===================  ======================  =====================
float32 / float32      1.2e-6 / 1.0000000   1e-3 / 0.9999           1.5e-3
float32 / bfloat16     3.5e-2 / 0.99939     0.08 / 0.995            0.1
bfloat16 / bfloat16    2.3e-2 / 0.99973     0.08 / 0.995            0.1
float16 (any pair)     as bfloat16 (float16 rounds finer, so honest peers pass)
=====================  ===================  ======================  =====================

Across quantizations (a dtype plus the quantization that changed the weights, "float32+int8";
``benchmarks/calibrate_quant.py``, tiny random Llamas requantized from float32, 4 and 12
layers, 2 seeds, plus SmolLM2's first 10 layers; 8-token prompt + 16 decoded tokens):

=====================  ===================  ======================  =====================
numerics pair          honest worst         threshold               smallest noise caught
=====================  ===================  ======================  =====================
float32 / +int8        7.0e-2 / 0.9976      0.12 / 0.99             0.15
float32 / +int4        0.62 / 0.803         0.9 / 0.5               gross lies only
+int8 / +int4          0.64 / 0.795         0.9 / 0.5               gross lies only
+int8 / +int8          3.6e-2 / 0.99952     0.08 / 0.995            0.08
+int4 / +int4          5.3e-3 / 0.99999     0.08 / 0.995            0.1
=====================  ===================  ======================  =====================

The kernels multiply in bfloat16, so peers with the same quantization compare at bfloat16's
thresholds. Requantized int4 differs from the float model by more than most lies, so a
checker with the same numerics is always preferred (`swarm.verify.audit`), and mixed pairs
catch only gross lies (zeros, skipped layers, noise of the output's own size). Int4 from GGUF
Q4_0/Q4_1 holds the checkpoint's own weights: its numerics are "bfloat16" (`Span.numerics`)
and it compares with float32 peers of the same file at bfloat16's thresholds.

Between float32 peers a lie of relative size 1e-2 is caught with a wide margin (the float32
threshold sits ~800x above honest float32 noise); against a bfloat16 peer only lies of ~10 %
and more are visible, because bfloat16 rounding alone reaches a few percent after a few
layers. That is why a checker with the same dtype as the checked peer is preferred.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "Comparison",
    "Thresholds",
    "compare",
    "first_mismatch",
    "position_errors",
    "thresholds_for",
]


@dataclass(frozen=True)
class Thresholds:
    """A position passes when ``rel_l2 <= max_rel_l2`` and ``cosine >= min_cosine``."""

    max_rel_l2: float
    min_cosine: float


FLOAT32_PAIR = Thresholds(max_rel_l2=1e-3, min_cosine=0.9999)
LOW_PRECISION_PAIR = Thresholds(max_rel_l2=0.08, min_cosine=0.995)

_LOW = {"bfloat16", "float16"}
# Peers whose weights differ by their quantization (``benchmarks/calibrate_quant.py``; the
# table in ``benchmarks/README.md``): the honest worst discrepancy, with a margin.
QUANTIZED_PAIRS = {
    frozenset(("none", "int8")): Thresholds(max_rel_l2=0.12, min_cosine=0.99),
    frozenset(("none", "int4")): Thresholds(max_rel_l2=0.9, min_cosine=0.5),
    frozenset(("int8", "int4")): Thresholds(max_rel_l2=0.9, min_cosine=0.5),
}
LOOSEST_PAIR = Thresholds(max_rel_l2=0.9, min_cosine=0.5)


def _name(dtype: str | torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def thresholds_for(a: str | torch.dtype, b: str | torch.dtype) -> Thresholds:
    """Thresholds for outputs computed with numerics ``a`` and ``b`` (order does not matter):
    a dtype, or a dtype and the quantization that changed the weights (``"float32+int8"``,
    as `Span.numerics` says).

    Peers with the same quantization compute with the same weights, so their dtypes decide.
    Across quantizations the calibrated pair thresholds apply (``QUANTIZED_PAIRS``, measured
    by ``benchmarks/calibrate_quant.py``). Unknown names are treated as the loosest pair
    (the safe-for-honest choice).
    """
    (dtype_a, _, quant_a), (dtype_b, _, quant_b) = (_name(a).partition("+"),
                                                    _name(b).partition("+"))  # fmt: skip
    if quant_a != quant_b:
        pair = frozenset((quant_a or "none", quant_b or "none"))
        return QUANTIZED_PAIRS.get(pair, LOOSEST_PAIR)
    if quant_a:  # the same quantized weights, activations in bfloat16 in the kernels
        return LOW_PRECISION_PAIR
    if dtype_a == "float32" and dtype_b == "float32":
        return FLOAT32_PAIR
    return LOW_PRECISION_PAIR


@dataclass(frozen=True)
class Comparison:
    """The verdict on two outputs: ``ok``, the worst position's errors and why it failed."""

    ok: bool
    rel_l2: float  # the largest over positions
    cosine: float  # the smallest over positions
    first_bad: int | None = None  # index along the sequence of the first failing position
    reason: str = ""


def position_errors(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position relative L2 error and cosine of ``(batch, seq, hidden)`` tensors.

    Returns two ``(seq,)`` float64 tensors (worst over the batch). Raises `ValueError` when
    the shapes differ.
    """
    if a.shape != b.shape or a.dim() != 3:
        raise ValueError(f"cannot compare shapes {list(a.shape)} and {list(b.shape)}")
    x, y = a.double(), b.double()  # (batch, seq, hidden)
    nx, ny = x.norm(dim=-1), y.norm(dim=-1)  # (batch, seq)
    scale = torch.maximum(nx, ny).clamp_min(1e-30)  # (batch, seq)
    rel = ((x - y).norm(dim=-1) / scale).amax(dim=0)  # (seq,)
    cos = ((x * y).sum(-1) / (nx * ny).clamp_min(1e-30)).amin(dim=0)  # (seq,)
    both_zero = (nx == 0) & (ny == 0)  # (batch, seq): identical zero vectors agree
    cos = torch.where(both_zero.all(dim=0), torch.ones_like(cos), cos)  # (seq,)
    return rel, cos


def compare(
    expected: torch.Tensor,
    got: torch.Tensor,
    thresholds: Thresholds,
) -> Comparison:
    """Compare two ``(batch, seq, hidden)`` outputs position by position.

    Never raises for bad values: a shape mismatch or NaN/Inf is a failed `Comparison`.
    """
    if expected.shape != got.shape or got.dim() != 3:
        return Comparison(False, float("inf"), -1.0, 0, f"shape {list(got.shape)}")
    finite = (torch.isfinite(expected) & torch.isfinite(got)).all(dim=-1).all(dim=0)  # (seq,)
    rel, cos = position_errors(
        torch.nan_to_num(expected, 0.0, 0.0, 0.0), torch.nan_to_num(got, 0.0, 0.0, 0.0)
    )
    bad = (~finite) | (rel > thresholds.max_rel_l2) | (cos < thresholds.min_cosine)  # (seq,)
    worst_rel = float(rel.max()) if rel.numel() else 0.0
    worst_cos = float(cos.min()) if cos.numel() else 1.0
    if not bool(bad.any()):
        return Comparison(True, worst_rel, worst_cos)
    first = int(bad.nonzero()[0, 0])
    if not bool(finite[first]):
        reason = f"NaN or Inf at position {first}"
    else:
        reason = (
            f"position {first}: rel L2 {float(rel[first]):.3g} (max {thresholds.max_rel_l2:g}), "
            f"cosine {float(cos[first]):.6f} (min {thresholds.min_cosine:g})"
        )
    return Comparison(False, worst_rel, worst_cos, first, reason)


def first_mismatch(expected: torch.Tensor, got: torch.Tensor, thresholds: Thresholds) -> int | None:
    """Index along the sequence of the first position that fails, or None if all pass."""
    return compare(expected, got, thresholds).first_bad
