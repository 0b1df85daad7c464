"""`GreedyScreen`: the float32 head's greedy token at about the cost of an int8 head.

A float32 lm_head reads its whole matrix per token (SmolLM2: 49,152 x 576, 113 MB, ~10 ms of
one thread). Greedy decoding needs only the largest logit. The screen keeps an int8 copy of
the matrix (one scale per vocabulary row, 28 MB) and, per row of hidden states:

1. computes every logit approximately through PyTorch's int8 weight-only kernel;
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
at build: MKL sums a ragged tail of 1-3 rows in another order, so blocks are padded).

The bound (x: the final norm's output, float32; column scales c are powers of two, so
z = x * c and W / c are exact; w'_i = s_i q_i the int8 row the kernel multiplies by z_b =
bfloat16(z)):

    |approx_i - W_i . x| <= |w~_i - w'_i| |z|         (the int8 rounding of the weights)
                          + |w'_i| (|z - z_b| + g |z_b|)  (the kernel's input and its float32 sums)
                          + 2^-7 |approx_i|             (the kernel's bfloat16 output)
    |float_i - W_i . x| <= g |W_i| |x|                 (the float head's own float32 sums)

with |.| Euclidean norms (Cauchy-Schwarz), w~_i = W_i / c, and g = 1.01 n 2^-24 for sums of
n products in float32 in any order. The row norms are computed once when the screen is built
(float32, rounded up by 4g). The float32 arithmetic of the bound itself is covered by a
relative 4g and an absolute 1e-3. Measured on SmolLM2 along its chat answer: the bound is
~1-3 logits, 10-150 candidates per token, ~0.2 ms to recompute them.
"""

from __future__ import annotations

import math

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

    @classmethod
    def build(cls, weight: torch.Tensor, *, probes: int = 2) -> GreedyScreen:
        """A screen for ``weight``, after checking on ``probes`` random inputs that
        recomputed blocks of rows equal the whole float32 matmul bit for bit.

        Raises:
            ValueError: they do not (see the class docstring), or ``weight`` is not
                contiguous float32 with rows of a multiple of 64 bytes (hidden % 16 == 0).
        """
        rows_fit = weight.dtype == torch.float32 and weight.is_contiguous()
        if not rows_fit or weight.shape[1] % _ALIGN:
            raise ValueError("a screen needs contiguous float32 rows of a multiple of 64 bytes")
        screen = cls(weight)
        generator = torch.Generator().manual_seed(0)
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

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Screened logits (rows, vocab) for ``x`` (rows, hidden), the final norm's float32
        output: each row's candidates hold the float32 head's logits (for that row alone),
        every other entry -inf, so each row's argmax is the float head's (see the module
        docstring). A row whose approximate logits are not all finite is computed whole in
        float32."""
        x = x.to(torch.float32)
        z = x * self.columns  # (rows, hidden), exact
        z_b = z.to(torch.bfloat16)
        approx = torch._weight_int8pack_mm(z_b, self.q, self.scales)  # (rows, vocab) bfloat16
        wide = z_b.to(torch.float32)
        norms = torch.stack([z, z - wide, wide, x]).norm(dim=2).tolist()  # 4 x (rows,)
        top, best = approx.max(dim=1)  # (rows,): bfloat16 values are exact in float
        largest = approx.abs().amax(dim=1).tolist()
        out = torch.full(approx.shape, float("-inf"))
        e_w, n_q, e_f = self.uniform
        for r, (t, i) in enumerate(zip(top.tolist(), best.tolist(), strict=True)):
            z_norm, input_error, x_norm = (
                norms[0][r],
                norms[1][r] + self.g * norms[2][r],
                norms[3][r],
            )
            # the bound of the approximate maximum's row, then one for every row
            own = (
                float(self.weight_error[i]) * z_norm
                + float(self.quant_norm[i]) * input_error
                + float(self.float_error[i]) * x_norm
                + _OUTPUT_ROUNDING * abs(t)
            )
            every = e_w * z_norm + n_q * input_error + e_f * x_norm + _OUTPUT_ROUNDING * largest[r]
            # The float head's largest logit is at least its logit at i, >= t - own; a row
            # whose float logit reaches that has an approximation >= t - own - every.
            floor = t - (own + every) * (1 + 4 * self.g) - _MARGIN
            if not (math.isfinite(floor) and math.isfinite(largest[r])):
                out[r] = F.linear(x[r : r + 1], self.weight)[0]  # (vocab,)
                continue
            # compared in bfloat16 against a value at or below floor (nearest rounding moves
            # a value by at most 2^-9 of it)
            below = torch.tensor(floor - 2.0**-8 * abs(floor) - 1e-30).to(torch.bfloat16)
            rows = (approx[r] >= below).nonzero()[:, 0]  # (candidates,)
            out[r, rows] = self._exact_rows(x[r], rows)
        return out
