"""Weights kept quantized: int8 and int4 linear layers over PyTorch's weight-only kernels.

A block's seven projections (q, k, v, o, gate, up, down) can hold

- **int8**, one scale per output channel, multiplied by ``torch._weight_int8pack_mm``:
  ``w = q * scale`` (q in -127..127);
- **int4**, one scale and one zero per group of 32 inputs, packed two to a byte by
  ``torch._convert_weight_to_int4pack_for_cpu`` and multiplied by
  ``torch._weight_int4pack_mm_for_cpu``: ``w = fma(q - 8, scale, zero)`` (q in 0..15; the
  kernel's rounding, measured: one fused multiply-add).

GGUF's Q4_0 (``w = d * (q - 8)``) and Q4_1 (``w = d * q + m``) blocks of 32 map onto int4
exactly: scale ``d``, zero 0 or ``m + 8d`` (exact in float32 for float16 ``d`` and ``m`` whose
exponents lie within 13 of each other, which :func:`int4_from_gguf_blocks` checks), and one
rounding of the same real number gives the same float, so the packed weights dequantize to
exactly ``gguf``'s values. Q8_0 has one scale per block of 32 where the int8 kernel has one
per row, so it is requantized per channel (relative error ~0.3 % of the weights); K-quants and
float weights are quantized from their float values (int8: ~0.4 %, int4 group-32
asymmetric: ~8 % on random normal weights; see ``benchmarks/quant.py`` for the logits).

Embeddings and norms stay as they are; a client's head can keep lm_head in int8 on request
(`swarm.shards.head`). These kernels exist for the CPU; on other devices
:func:`serving_quantization` keeps the weights in float (dequantized as before).
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from swarm.errors import ShardError

__all__ = [
    "GROUP",
    "QUANTIZED_LINEARS",
    "Int4Linear",
    "Int8Linear",
    "QuantLinear",
    "Quantization",
    "fuse_linears",
    "int4_from_gguf_blocks",
    "quantize_linear",
    "serving_quantization",
]

GROUP = 32
# The activations' dtype inside the quantized layers: PyTorch's CPU weight-only kernels are
# fast for bfloat16 inputs only (one thread, 1536x576, one row: int8 0.12 ms and int4 0.4-0.7
# ms in bfloat16, 4.5 ms and 8.1 ms in float32, against 0.4 ms for a float32 dense matmul;
# float16 is as slow as float32). Outputs are cast back to the span's dtype.
COMPUTE_DTYPE = torch.bfloat16
DENSE_ROWS = 16  # int8 layers over more rows than this multiply densely (see Int8Linear)
# Our per-layer parameter names (see swarm.shards.checkpoint) of the matrices kept quantized.
QUANTIZED_LINEARS = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")
_INNER_K_TILES = 2
_EXACT_INT4 = ("Q4_0", "Q4_1")


class Quantization(enum.Enum):
    """How a span keeps its projection weights: ``none`` (the serving dtype), ``int8`` or
    ``int4``. The value is what the CLI takes and the announcement carries."""

    NONE = "none"
    INT8 = "int8"
    INT4 = "int4"

    @classmethod
    def parse(cls, text: str) -> Quantization:
        """``Quantization("int8")`` with a `ShardError` naming the choices on a bad name."""
        try:
            return cls(text)
        except ValueError:
            names = ", ".join(q.value for q in cls)
            raise ShardError(f"unknown quantization {text!r} (one of: {names})") from None


def serving_quantization(
    requested: Quantization | None, stored_types: set[str], device: torch.device
) -> Quantization:
    """The quantization a span is served in: ``requested``, or by default the checkpoint's own
    where a kernel exists (GGUF layer matrices all Q4_0/Q4_1: int4; all Q8_0: int8; anything
    else: none). On a device other than the CPU, always none (no kernel wired there yet: the
    weights are dequantized to the serving dtype, as before)."""
    if device.type != "cpu":
        return Quantization.NONE
    if requested is not None:
        return requested
    if stored_types and stored_types <= set(_EXACT_INT4):
        return Quantization.INT4
    if stored_types == {"Q8_0"}:
        return Quantization.INT8
    return Quantization.NONE


class QuantLinear(nn.Module):
    """What both quantized layers share: the input/output sizes and an optional float bias."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.exact = False  # True: the weights equal the checkpoint's (GGUF Q4_0/Q4_1)
        self.bias: torch.Tensor | None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.dim() == 2
        rows = x if flat else x.reshape(-1, self.in_features)  # (tokens, in)
        if rows.dtype != COMPUTE_DTYPE or not rows.is_contiguous():
            rows = rows.to(COMPUTE_DTYPE, memory_format=torch.contiguous_format)
        out = self.matmul(rows).to(x.dtype)  # (tokens, out)
        if self.bias is not None:
            out = out + self.bias
        return out if flat else out.view(*x.shape[:-1], self.out_features)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The weight as the kernel sees it, (out, in) in float32."""
        raise NotImplementedError


class Int8Linear(QuantLinear):
    """``x @ (q * scale).T``: ``weight`` int8 (out, in), ``scales`` (out,) float32 (and the
    bfloat16 copy the kernel takes)."""

    def __init__(
        self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
    ) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias)
        self.weight: torch.Tensor
        self.scales: torch.Tensor
        self.kernel_scales: torch.Tensor
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("scales", scales.to(torch.float32).contiguous())
        self.register_buffer("kernel_scales", scales.to(COMPUTE_DTYPE).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // self.in_features <= DENSE_ROWS:
            return super().forward(x)
        # A long prefill: the weight dequantized for this call and one dense matmul (128
        # rows: ~1.2 ms of dequantizing against ~30 ms more in the bfloat16 kernel).
        return F.linear(x, self.dequantize().to(x.dtype), self.bias)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x, self.weight, self.kernel_scales)  # (tokens, out)

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.scales.float()[:, None]  # (out, in)


class Int4Linear(QuantLinear):
    """Group-wise int4: ``packed`` uint8 (out, in/2) in the kernel's layout, and
    ``scales_zeros`` (in/group, out, 2) in float32 (exact for GGUF's float16 scales), with the
    bfloat16 copy the kernel takes."""

    def __init__(
        self,
        packed: torch.Tensor,
        scales_zeros: torch.Tensor,
        in_features: int,
        bias: torch.Tensor | None,
        group: int = GROUP,
    ) -> None:
        super().__init__(in_features, packed.shape[0], bias)
        self.group = group
        self.packed: torch.Tensor
        self.scales_zeros: torch.Tensor
        self.kernel_scales_zeros: torch.Tensor
        self.register_buffer("packed", packed)
        self.register_buffer("scales_zeros", scales_zeros.to(torch.float32).contiguous())
        self.register_buffer("kernel_scales_zeros", scales_zeros.to(COMPUTE_DTYPE).contiguous())

    @classmethod
    def pack(
        cls,
        q: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> Int4Linear:
        """From ``q`` (out, in) integers 0..15, ``scales`` and ``zeros`` (out, in/group)."""
        packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), _INNER_K_TILES)
        del dtype  # the activations run in COMPUTE_DTYPE whatever the span's dtype
        sz = torch.stack([scales.t(), zeros.t()], dim=-1)  # (in/group, out, 2)
        return cls(packed, sz, q.shape[1], bias)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(
            x, self.packed, self.group, self.kernel_scales_zeros
        )  # (tokens, out)

    def dequantize(self) -> torch.Tensor:
        """The stored weights, through the kernel with the float32 scales: each identity row
        picks one input's weights exactly (``fma(q - 8, scale, zero)`` per weight)."""
        return self._through_kernel(self.scales_zeros)

    def integers(self) -> torch.Tensor:
        """The stored integers ``q`` (out, in), 0..15, read back through the kernel with
        scale 1 and zero 0 (the packed layout is the kernel's own and differs by CPU), in
        bfloat16, where the kernel is fast and -8..7 exact."""
        unit = torch.zeros_like(self.scales_zeros, dtype=torch.bfloat16)
        unit[..., 0] = 1.0
        return (self._through_kernel(unit) + 8).to(torch.int32)

    def _through_kernel(self, scales_zeros: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(self.in_features, dtype=scales_zeros.dtype)  # (in, in)
        out = torch._weight_int4pack_mm_for_cpu(eye, self.packed, self.group, scales_zeros)
        return out.t()  # (out, in)


_PACK_ROWS = 64


@functools.cache
def _packs_stack() -> bool:
    """Whether int4 packed tensors of ``_PACK_ROWS``-row multiples can be stacked as they
    are on this CPU (one probe per process). The kernel's layout interleaves blocks of
    output rows, 64 on an AVX-512 CPU: stacking the packed k and v projections of 32 rows
    each beside q gave wrong outputs there (cosine 0.15 against float32)."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, 16, (_PACK_ROWS, 64), generator=gen, dtype=torch.int32) for _ in "ab")
    pack = torch._convert_weight_to_int4pack_for_cpu
    stacked = torch.cat([pack(a, _INNER_K_TILES), pack(b, _INNER_K_TILES)])
    return torch.equal(stacked, pack(torch.cat([a, b]), _INNER_K_TILES))


def fuse_linears(layers: Sequence[nn.Module]) -> QuantLinear | None:
    """One quantized layer whose outputs are ``layers``' side by side (their rows stacked),
    each output the same sums as its own layer's; None where they cannot be fused: not all
    quantized alike (kind, group, input size), or some with a bias and some without."""
    first = layers[0]
    if not isinstance(first, QuantLinear) or any(type(x) is not type(first) for x in layers):
        return None
    quantized = [x for x in layers if isinstance(x, QuantLinear)]
    if any(x.in_features != first.in_features for x in quantized):
        return None
    biases = [x.bias for x in quantized]
    if any(b is None for b in biases) and any(b is not None for b in biases):
        return None
    bias = None if biases[0] is None else torch.cat([b for b in biases if b is not None])
    fused: QuantLinear
    if isinstance(first, Int8Linear):
        int8 = [x for x in quantized if isinstance(x, Int8Linear)]
        weight = torch.cat([x.weight for x in int8])  # (sum of outs, in)
        fused = Int8Linear(weight, torch.cat([x.scales for x in int8]), bias)
    elif isinstance(first, Int4Linear):
        int4 = [x for x in quantized if isinstance(x, Int4Linear)]
        if any(x.group != first.group for x in int4):
            return None
        if all(x.out_features % _PACK_ROWS == 0 for x in int4) and _packs_stack():
            packed = torch.cat([x.packed for x in int4])  # (sum of outs, in/2)
        else:  # the kernel's layout interleaves blocks of output rows: pack anew
            q = torch.cat([x.integers() for x in int4])  # (sum of outs, in)
            packed = torch._convert_weight_to_int4pack_for_cpu(q, _INNER_K_TILES)
        scales_zeros = torch.cat([x.scales_zeros for x in int4], dim=1)  # (groups, outs, 2)
        fused = Int4Linear(packed, scales_zeros, first.in_features, bias, first.group)
    else:
        return None
    fused.exact = all(x.exact for x in quantized)
    return fused


def quantize_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, kind: Quantization, dtype: torch.dtype
) -> QuantLinear:
    """Quantize a float ``weight`` (out, in): int8 per output channel (symmetric), or int4 per
    group of 32 (asymmetric: the group's minimum and maximum span 0..15).

    Raises:
        ShardError: ``kind`` is none, or int4 and ``in`` is not a multiple of 32.
    """
    w = weight.to(torch.float32)  # (out, in)
    if kind is Quantization.INT8:
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return Int8Linear(q, scales, bias)
    if kind is Quantization.INT4:
        out, size = w.shape
        if size % GROUP:
            raise ShardError(f"int4 needs input sizes that are multiples of {GROUP}, got {size}")
        groups = w.view(out, size // GROUP, GROUP)  # (out, groups, 32)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # (out, groups)
        scales = ((high - low) / 15).clamp(min=1e-12)
        q = torch.round((groups - low[..., None]) / scales[..., None]).clamp(0, 15)
        return Int4Linear.pack(q.view(out, size), scales, low + 8 * scales, bias, dtype)
    raise ShardError("quantize_linear needs int8 or int4")


def int4_from_gguf_blocks(
    blocks: np.ndarray[Any, np.dtype[np.uint8]], type_name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0 or Q4_1 blocks, (rows, bytes per row), as int4 ``q`` (rows, cols) in 0..15 and the
    group ``scales`` and ``zeros`` (rows, cols/32) in float32, exactly: ``fma(q - 8, scale,
    zero)`` equals ``gguf``'s dequantization.

    Raises:
        ShardError: another type, or a Q4_1 block whose ``m + 8d`` float32 cannot hold exactly.
    """
    if type_name not in _EXACT_INT4:
        raise ShardError(f"{type_name} blocks do not map onto int4 exactly")
    size = 18 if type_name == "Q4_0" else 20
    rows = blocks.shape[0]
    b = np.ascontiguousarray(blocks).reshape(rows, -1, size)  # (rows, groups, bytes)
    d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # (rows, groups)
    nibbles = b[..., size - 16 :]  # (rows, groups, 16)
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)  # (rows, groups, 32)
    if type_name == "Q4_0":
        zeros = np.zeros_like(d)
    else:
        m = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        zeros = m + 8 * d
        if not np.array_equal(zeros.astype(np.float64), m.astype(np.float64) + 8.0 * d):
            raise ShardError("a Q4_1 block's min + 8 * scale is not exact in float32")
    return (
        torch.from_numpy(q.reshape(rows, -1).astype(np.int32)),
        torch.from_numpy(d),
        torch.from_numpy(zeros),
    )
