"""`GreedyScreen`: the float32 head's greedy token at under half the float head's cost.

A float32 lm_head reads its whole matrix per token (SmolLM2: 49,152 x 576, 113 MB, ~10 ms of
one thread). Greedy decoding needs only the largest logit. The screen keeps an int8 copy of
the matrix (one scale per vocabulary row, 28 MB) and, per row of hidden states:

1. computes every logit approximately in int8: through FBGEMM's int8 x int8 matmul (exact
   int32 sums; ~3 ms) where this PyTorch ships it and a probe at build finds it exact, else
   through PyTorch's int8 weight-only kernel (bfloat16 in and out; ~5.5 ms);
2. bounds each approximate logit's distance from the exact real dot product (below), so the
   rows whose logit could still be the float head's largest are known: those within the
   bound of the approximate maximum;
3. recomputes those candidates in float32, exactly as the float head's matmul computes them
   (the same kernel over a gathered block of rows; checked bit for bit when the screen is
   built), and returns logits in which the candidates hold their float32 values and every
   other entry is -inf (its float logit is provably below the candidates' largest).

So ``screened.argmax(-1)`` equals ``float_logits.argmax(-1)`` (ties included: the first
index among equal largest logits) for each row computed alone. Only the candidates' values
are the float head's: sampling (temperature, top-k, top-p) must use the float logits.
The screen is built only where recomputed rows are bit for bit the whole matmul's (checked
at build: MKL sums a ragged tail of 1-3 rows in another order, and rows at another address
modulo 64 bytes in another order, so blocks are padded and aligned like the matrix).

The bound (x: the final norm's output, float32; column scales c are powers of two, so
z = x * c and W / c are exact; w'_i = s_i q_i the int8 row; z^ the input the pass multiplies
by: bfloat16(z) for the weight-only kernel, z on a 13-bit grid for FBGEMM):

    |approx_i - W_i . x| <= |w~_i - w'_i| |z|        (the int8 rounding of the weights)
                          + |w'_i| (|z - z^| + e_in)  (the pass's input; its float32 sums)
                          + r |approx_i| + |w'_i| e_out   (its output's rounding)
    |float_i - W_i . x| <= g |W_i| |x|                (the float head's own float32 sums)

with |.| Euclidean norms (Cauchy-Schwarz), w~_i = W_i / c, g = 1.01 n 2^-24 for sums of n
products in float32 in any order; for the weight-only kernel e_in = g |z^|, r = 2^-7
(bfloat16 output), e_out = 0; for FBGEMM e_in = 0 (integer sums), r = 2^-22 and e_out =
2^-20 times the grid rows' norms. The row norms are computed once when the screen is built
(float32, rounded up by 4g); the float32 arithmetic of the bound itself is covered by a
relative 4g and an absolute 1e-3. Measured on SmolLM2 along its chat answer: the bound is
~1-3 logits, 5-150 candidates per token, ~0.2 ms to recompute them.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["GreedyScreen"]

_CHUNK = 4096  # rows quantized at a time when a screen is built
_BLOCK = 64  # candidates are recomputed in blocks of this many rows (see `_exact_rows`)
_ALIGN = 16  # floats: 64 bytes
_OUTPUT_ROUNDING = 2.0**-7  # bfloat16 keeps 8 significant bits: relative error <= 2^-8
_MARGIN = 1e-3  # absolute slack for the float32 arithmetic of the bound itself


def _sum_error(n: int) -> float:
    """g: the relative error bound of a float32 sum of n products, in any order."""
    return 1.01 * n * 2.0**-24


class GreedyScreen:
    """An int8 copy of a float32 ``weight`` (vocab, hidden) with what the error bound needs.

    Raises `ValueError` from `build` where the float32 matmul of a gathered block of rows is
    not bit for bit the whole matmul's (a BLAS that sums differently by shape): a screen
    could then pick another token than the float head, so none is built.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        w = weight.detach().to(torch.float32)  # (vocab, hidden)
        self.weight = w  # the float head's matrix (shared, not copied)
        column_max = w.abs().amax(dim=0).clamp(min=2.0**-100)  # (hidden,)
        # powers of two: x * c and W / c are exact in float32
        self.columns = torch.exp2(torch.round(torch.log2(column_max)))
        self.g = _sum_error(w.shape[1])
        vocab = w.shape[0]
        self.q = torch.empty(w.shape, dtype=torch.int8)
        self.scales = torch.empty(vocab, dtype=torch.bfloat16)
        self.weight_error = torch.empty(vocab)  # |w~_i - w'_i|
        self.quant_norm = torch.empty(vocab)  # |w'_i|
        self.float_error = torch.empty(vocab)  # g |W_i|
        up = 1 + 4 * self.g  # float32 norms (sums of n squares, a root) rounded up
        for start in range(0, vocab, _CHUNK):  # a chunk of rows at a time: bounded memory
            rows = slice(start, start + _CHUNK)
            scaled = w[rows] / self.columns  # (chunk, hidden), exact
            # bfloat16 scales, so the kernel multiplies by exactly the scale used here
            scales = (scaled.abs().amax(dim=1).clamp(min=2.0**-100) / 127).to(torch.bfloat16)
            s = scales.to(torch.float32)[:, None]
            q = torch.round(scaled / s).clamp(-127, 127)
            dequantized = q * s  # exact: 7 bits times 8 bits
            self.q[rows] = q.to(torch.int8)
            self.scales[rows] = scales
            error = scaled - dequantized  # exact: |error| <= s/2, or q = 0 and error = scaled
            self.weight_error[rows] = error.norm(dim=1) * up
            self.quant_norm[rows] = dequantized.norm(dim=1) * up
            self.float_error[rows] = w[rows].norm(dim=1) * (self.g * up)
        self.uniform = (
            float(self.weight_error.max()),
            float(self.quant_norm.max()),
            float(self.float_error.max()),
        )
        self._packed: Any = None  # FBGEMM's packed copy of q, where `_use_fbgemm` succeeds
        self._fbgemm_op: Any = None

    def _use_fbgemm(self, generator: torch.Generator) -> bool:
        """Pack q for FBGEMM's int8 x int8 matmul where this PyTorch has it (quantized
        tensors: deprecated, but still shipped in 2.13) and check, on random and
        worst-case inputs, that its sums are exact (the bound assumes it); else keep
        PyTorch's int8 weight-only kernel."""
        vocab = self.q.shape[0]
        try:
            op = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the deprecation of quantized tensors
                weight = torch._make_per_channel_quantized_tensor(
                    self.q, self.scales.to(torch.float64), torch.zeros(vocab, dtype=torch.long), 0
                )
                packed = torch.ops.quantized.linear_prepack(weight, None)
        except (AttributeError, RuntimeError):
            return False
        used = self.q.ne(0).any(dim=1)  # rows of zeros give 0 whatever their scale
        if bool(used.any()) and float(self.scales[used].float().min()) < 2.0**-60:
            return False  # S s_i could fall below float32's normal range
        heavy = int(self.q.abs().sum(dim=1).argmax())  # the largest sums: saturation first
        some = torch.cat(
            [torch.tensor([heavy]), torch.randint(0, vocab, (255,), generator=generator)]
        )
        dequantized = self.q[some].to(torch.float64) * self.scales[some].to(torch.float64)[:, None]
        hidden = self.q.shape[1]
        worst = self.q[heavy].to(torch.float32).sign() * 63
        for n in [torch.randint(-63, 64, (2, hidden), generator=generator), worst.expand(2, -1)]:
            step = 2.0**-5
            grid = n.to(torch.float32) * step
            try:
                out = op(grid, step, 64, packed).to(torch.float64)  # (2, vocab)
            except RuntimeError:
                return False
            exact = grid.to(torch.float64) @ dequantized.t()  # (2, some)
            if not bool(((out[:, some] - exact).abs() <= 2.0**-22 * exact.abs() + 1e-30).all()):
                return False
        self._packed, self._fbgemm_op = packed, op
        self.q = self.q[:0]  # the packed copy replaces it
        return True

    @classmethod
    def build(cls, weight: torch.Tensor, *, probes: int = 2, fbgemm: bool = True) -> GreedyScreen:
        """A screen for ``weight``, after checking on ``probes`` random inputs that
        recomputed blocks of rows equal the whole float32 matmul bit for bit. With
        ``fbgemm``, the int8 pass runs through FBGEMM where it is there and exact
        (`_use_fbgemm`), else through PyTorch's int8 weight-only kernel.

        Raises:
            ValueError: they do not (see the class docstring), or ``weight`` is not
                contiguous float32 with rows of a multiple of 64 bytes (hidden % 16 == 0).
        """
        rows_fit = weight.dtype == torch.float32 and weight.is_contiguous()
        if not rows_fit or weight.shape[1] % _ALIGN:
            raise ValueError("a screen needs contiguous float32 rows of a multiple of 64 bytes")
        screen = cls(weight)
        generator = torch.Generator().manual_seed(0)
        if fbgemm:
            screen._use_fbgemm(generator)
        vocab = weight.shape[0]
        for _ in range(probes):
            x = torch.randn(1, weight.shape[1], generator=generator)
            full = F.linear(x, screen.weight)[0]  # (vocab,)
            for size in (1, 3, _BLOCK + 5, 4 * _BLOCK):
                rows = torch.randperm(vocab, generator=generator)[: min(size, vocab)]
                rows = torch.cat([rows, torch.arange(max(0, vocab - 3), vocab)])  # the end
                if not torch.equal(screen._exact_rows(x[0], rows), full[rows]):
                    raise ValueError(
                        "float32 logits recomputed for a block of rows differ from the whole "
                        "matmul's in the last bits on this machine"
                    )
        return screen

    def _exact_rows(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Float32 logits of ``rows`` (n,) for ``x`` (hidden,), as the whole matmul gives
        them. BLAS computes a ragged tail of rows in other code (measured with MKL: a tail
        of 1-3 rows sums in another order), so gathered rows are padded to a multiple of
        `_BLOCK`, and rows in the matrix's own ragged tail are recomputed with the slice that
        ends the matrix (a tail of the same length)."""
        vocab = self.weight.shape[0]
        aligned = vocab - vocab % _BLOCK
        out = torch.empty(rows.shape[0])
        inside = rows < aligned
        body = rows[inside]
        if body.shape[0]:
            n, hidden = body.shape[0], self.weight.shape[1]
            padded = -(-n // _BLOCK) * _BLOCK
            # the block starts at the same address modulo 64 bytes as the matrix (rows are
            # a multiple of 64 bytes long): MKL's sums depend on the rows' alignment
            space = torch.empty(padded * hidden + _ALIGN)
            skip = (self.weight.data_ptr() - space.data_ptr()) % (_ALIGN * 4) // 4
            block = space[skip : skip + padded * hidden].view(padded, hidden)
            torch.index_select(self.weight, 0, F.pad(body, (0, padded - n)), out=block)
            out[inside] = F.linear(x[None], block)[0, :n]
        if aligned < vocab and not bool(inside.all()):
            start = max(0, aligned - _BLOCK)
            ending = F.linear(x[None], self.weight[start:])[0]  # (vocab - start,)
            out[~inside] = ending[rows[~inside] - start]
        return out

    @property
    def kernel(self) -> str:
        """Which int8 pass screens: ``"fbgemm"`` or ``"int8pack"`` (`build`)."""
        return "fbgemm" if self._packed is not None else "int8pack"

    def _int8pack(self, z: torch.Tensor) -> _Pass:
        """PyTorch's int8 weight-only kernel: bfloat16 input, float32 sums, bfloat16 out."""
        z_b = z.to(torch.bfloat16)
        approx = torch._weight_int8pack_mm(z_b, self.q, self.scales)  # (rows, vocab) bfloat16
        wide = z_b.to(torch.float32)
        norms = torch.stack([z - wide, wide]).norm(dim=2).tolist()  # 2 x (rows,)
        input_error = [d + self.g * n for d, n in zip(*norms, strict=True)]
        return _Pass(approx, input_error, [0.0] * z.shape[0], _OUTPUT_ROUNDING, 2.0**-8)

    def _fbgemm(self, z: torch.Tensor) -> _Pass:
        """FBGEMM's int8 x int8 matmul with int32 sums (exact), on two rows per input: z on a
        7-bit grid of a power-of-two step S, and its rounding error on a grid 64 times finer
        (so the input's error is ~S/256 per element, not S/2). Inputs given on the grid are
        quantized exactly (statically, zero point 64: 1..127, so AVX2's pairwise 16-bit sums
        cannot saturate); outputs are S s_i acc, one float32 rounding each."""
        assert self._packed is not None
        rows = z.shape[0]
        peak = z.abs().amax(dim=1).clamp(min=2.0**-100)  # (rows,)
        step = torch.exp2(torch.ceil(torch.log2(peak / 63)))[:, None]  # S per row, |z/S| <= 63
        n1 = torch.round(z / step).clamp(-63, 63)
        n2 = torch.round((z - n1 * step) * 64 / step).clamp(-63, 63)  # exact residual, scaled
        approx = torch.empty(rows, self.weight.shape[0])
        abs_error, input_error = [], []
        for r in range(rows):  # one static scale per call
            if not 2.0**-40 <= float(step[r]) <= 2.0**40:  # S s_i could leave float32's range
                approx[r] = float("nan")  # so `logits` computes this row in float32
                input_error.append(0.0)
                abs_error.append(0.0)
                continue
            grid = torch.stack([n1[r], n2[r]]) * step[r]  # (2, hidden), exact
            out = self._fbgemm_op(grid, float(step[r]), 64, self._packed)  # (2, vocab)
            torch.add(out[0], out[1], alpha=1 / 64, out=approx[r])
            zhat = (n1[r] + n2[r] / 64) * step[r]  # exact: 7 + 6 bits times a power of two
            norms = torch.stack([z[r] - zhat, grid[0], grid[1]]).norm(dim=1).tolist()
            input_error.append(norms[0])
            abs_error.append(2.0**-20 * (norms[1] + norms[2]))
        return _Pass(approx, input_error, abs_error, 2.0**-22, 2.0**-22)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Screened logits (rows, vocab) for ``x`` (rows, hidden), the final norm's float32
        output: each row's candidates hold the float32 head's logits (for that row alone),
        every other entry -inf, so each row's argmax is the float head's (see the module
        docstring). A row whose approximate logits are not all finite is computed whole in
        float32."""
        x = x.to(torch.float32)
        if not bool(torch.isfinite(x).all()):  # rows alone, as the float head would
            return torch.cat([F.linear(row[None], self.weight) for row in x])
        z = x * self.columns  # (rows, hidden), exact
        done = self._fbgemm(z) if self._packed is not None else self._int8pack(z)
        approx = done.approx
        norms = torch.stack([z, x]).norm(dim=2).tolist()  # 2 x (rows,)
        top, best = approx.max(dim=1)  # (rows,): bfloat16 values are exact in float
        largest = approx.abs().amax(dim=1).tolist()
        out = torch.full(approx.shape, float("-inf"))
        e_w, n_q, e_f = self.uniform
        for r, (t, i) in enumerate(zip(top.tolist(), best.tolist(), strict=True)):
            z_norm, x_norm = norms[0][r], norms[1][r]
            inexact = done.input_error[r] + done.output_error[r]  # per unit of |w'_i|
            # the bound of the approximate maximum's row, then one for every row
            own = (
                float(self.weight_error[i]) * z_norm
                + float(self.quant_norm[i]) * inexact
                + float(self.float_error[i]) * x_norm
                + done.rounding * abs(t)
            )
            every = e_w * z_norm + n_q * inexact + e_f * x_norm + done.rounding * largest[r]
            # The float head's largest logit is at least its logit at i, >= t - own; a row
            # whose float logit reaches that has an approximation >= t - own - every.
            floor = t - (own + every) * (1 + 4 * self.g) - _MARGIN
            if not (math.isfinite(floor) and math.isfinite(largest[r])):
                out[r] = F.linear(x[r : r + 1], self.weight)[0]  # (vocab,)
                continue
            # compared in the approximation's dtype against a value at or below floor
            # (nearest rounding moves a value by at most half its relative precision)
            below = floor - done.precision * abs(floor) - 1e-30
            threshold = torch.tensor(below).to(approx.dtype)
            rows = (approx[r] >= threshold).nonzero()[:, 0]  # (candidates,)
            out[r, rows] = self._exact_rows(x[r], rows)
        return out


@dataclass(frozen=True)
class _Pass:
    """An approximate pass: ``approx`` (rows, vocab); per row, the input's error and the
    output's absolute error, each per unit of |w'_i|; the output's relative rounding; and
    the relative precision of ``approx``'s dtype (for comparing against it)."""

    approx: torch.Tensor
    input_error: list[float]
    output_error: list[float]
    rounding: float
    precision: float
