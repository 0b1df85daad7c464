"""Our Llama-family decoder block: RMSNorm, attention with RoPE and GQA, SwiGLU MLP.

The modules hold parameters only; the KV cache is passed in (see :mod:`swarm.shards.cache`).
Submodule names are ours; :func:`swarm.shards.checkpoint.checkpoint_names` maps them to the
checkpoint's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from swarm.shards.cache import KVCache
from swarm.shards.config import ModelConfig
from swarm.shards.quant import QuantLinear, fuse_linears
from swarm.shards.rope import apply_rope

__all__ = [
    "AttentionMask",
    "Block",
    "RMSNorm",
    "RaggedBatch",
    "RaggedPart",
    "build_attention_mask",
    "decode_attention",
]


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 and cast back (as Llama does)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        # The mean's divisor and eps as float32 scalars of their own (on the CPU even where
        # the module is built on the meta device): a Python number in a CPU op is first
        # wrapped and cast, an allocation and three dispatches each time (see `forward`).
        self._size = torch.tensor(float(size), device="cpu")
        self._eps = torch.tensor(eps, dtype=torch.float32, device="cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype, weight = x.dtype, self.weight
        if x.device.type == "cpu":
            # PyTorch's own arithmetic on the CPU (`F.rms_norm`'s float32 composite and the
            # `mean`'s sum then division), bit for bit (checked in the tests), in 7 dispatches
            # instead of ~20: it wraps eps and the mean's divisor as tensors and casts them
            # on every call, ~1/3 of the norm's time in a decode step
            h = x if dtype == torch.float32 else x.to(torch.float32)  # (..., size)
            rms = h.pow(2).sum(-1, keepdim=True).div_(self._size).add_(self._eps).rsqrt_()
            if dtype == torch.float32 and weight.dtype == torch.float32:
                return (h * rms).mul_(weight)  # (..., size)
            return weight * (h * rms).to(dtype)
        if dtype == torch.float32 and weight.dtype == torch.float32:
            return F.rms_norm(x, weight.shape, weight, self.eps)  # one kernel where fused
        h = x.to(torch.float32)  # (..., size)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., size)
        return weight * h.to(dtype)


HALF_DTYPES = (torch.bfloat16, torch.float16)
# Steps of at most this many tokens after a cache attend one query at a time (`Attention`):
# as many as a speculative step carries (k + 1 <= 9) and as the quantized layers' row-by-row
# kernels take (`swarm.shards.quant.DENSE_ROWS`).
ROW_BY_ROW_TOKENS = 16


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """One new query per row against its keys, as SDPA computes it (scale 1/sqrt(head_dim),
    grouped-query heads), in float32: ``q`` (batch, heads, 1, head_dim), ``k``/``v``
    (batch, kv_heads, total, head_dim), ``mask`` (batch, 1, 1, total) True where a key may
    be seen, or None. Returns (batch, heads, 1, head_dim) in ``q``'s dtype.

    For half precision on a CPU, where PyTorch's SDPA kernel for a single bfloat16 query is
    slow: `benchmarks/kernels.py` (one thread, 16 heads of 64) measured this 1.6x faster
    against 40 keys and 2.6-5x against 512-2,000."""
    batch, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    grouped = q.reshape(batch, kv_heads, heads // kv_heads, dim).float()  # (b, kv, group, d)
    scores = torch.matmul(grouped, k.float().transpose(-1, -2))  # (batch, kv, group, total)
    scores = scores * (1.0 / math.sqrt(dim))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # mask: (batch, 1, 1, total)
    weights = torch.softmax(scores, dim=-1)  # (batch, kv, group, total)
    out = torch.matmul(weights, v.float())  # (batch, kv, group, head_dim)
    return out.reshape(batch, heads, 1, dim).to(q.dtype)


@dataclass(frozen=True)
class AttentionMask:
    """What to hand to SDPA: an explicit boolean mask (batch, 1, seq, total) or a causal flag."""

    mask: torch.Tensor | None
    is_causal: bool


@dataclass(frozen=True)
class RaggedPart:
    """One group of a ragged batch: ``batch`` rows of ``seq`` new tokens, their RoPE angles
    ``cos``/``sin`` (batch, seq, 1, head_dim; the signed sin of `rope_cos_sin`), attention
    pattern and cache (or None). Built once per forward and passed to every layer."""

    batch: int
    seq: int
    cos: torch.Tensor
    sin: torch.Tensor
    mask: AttentionMask
    cache: KVCache | None


@dataclass(frozen=True)
class RaggedBatch:
    """Groups laid end to end (`Span.forward_batch`): their parts, in order, and every
    token's RoPE angles ``cos``/``sin`` (tokens, 1, head_dim; the sin signed as in
    `rope_cos_sin`), built once for all layers."""

    parts: tuple[RaggedPart, ...]
    cos: torch.Tensor
    sin: torch.Tensor

    @classmethod
    def of(cls, parts: Sequence[RaggedPart]) -> RaggedBatch:
        def token_major(t: torch.Tensor) -> torch.Tensor:  # (batch, seq, 1, d) -> (b*s, 1, d)
            return t.reshape(-1, 1, t.shape[-1])

        if len(parts) == 1:  # views, no copy
            return cls(tuple(parts), token_major(parts[0].cos), token_major(parts[0].sin))
        cos = torch.cat([token_major(p.cos) for p in parts])  # (tokens, 1, head_dim)
        sin = torch.cat([token_major(p.sin) for p in parts])  # (tokens, 1, head_dim)
        return cls(tuple(parts), cos, sin)


def build_attention_mask(
    seq: int, start: int, key_valid: torch.Tensor | None, device: torch.device
) -> AttentionMask:
    """The attention pattern for ``seq`` new queries at slots ``start..start+seq-1``.

    ``key_valid`` (batch, start+seq) is True where a key slot holds a real token, or None when
    no slot is padding. A query always sees itself, so padding rows stay finite.
    """
    if key_valid is None and seq == 1:
        return AttentionMask(None, False)  # one new token attends to everything before it
    if key_valid is None and start == 0:
        return AttentionMask(None, True)
    total = start + seq
    query_slot = torch.arange(start, total, device=device)[:, None]  # (seq, 1)
    key_slot = torch.arange(total, device=device)[None, :]  # (1, total)
    allowed = key_slot <= query_slot  # (seq, total)
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :]  # (batch, seq, total)
        allowed = allowed | (key_slot == query_slot)  # (batch, seq, total)
    else:
        allowed = allowed[None]  # (1, seq, total)
    return AttentionMask(allowed[:, None], False)  # (batch, 1, seq, total)


class Attention(nn.Module):
    """Multi-head attention with grouped-query key/value heads and RoPE."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        qkv_bias = config.attention_bias or config.qkv_bias
        hidden = config.hidden_size
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.q = nn.Linear(hidden, q_out, bias=qkv_bias)
        self.k = nn.Linear(hidden, kv_out, bias=qkv_bias)
        self.v = nn.Linear(hidden, kv_out, bias=qkv_bias)
        self.o = nn.Linear(q_out, hidden, bias=config.attention_bias)
        self.qkv: QuantLinear | None = None  # q, k and v side by side (`fuse_projections`)
        self._sizes = [q_out, kv_out, kv_out]

    def fuse_projections(self) -> None:
        """Multiply q, k and v as one quantized matrix (their rows stacked): one kernel call
        and one cast of the input instead of three, each output bit for bit what its own
        layer gives (per output row the same sums). Float layers stay apart (a dense matmul
        of another width may sum in another order). Drops the separate layers."""
        fused = fuse_linears([self.q, self.k, self.v])
        if fused is not None:
            self.qkv = fused
            del self.q, self.k, self.v

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` (..., hidden) -> q (..., heads, head_dim) and k (..., kv_heads, head_dim)
        after RoPE with ``cos``/``sin`` (..., 1, head_dim), and v (..., kv_heads*head_dim).
        q and k go through RoPE as one tensor (the same values, half the calls)."""
        lead, dim = x.shape[:-1], self.head_dim
        q_out, kv_out, _ = self._sizes
        if self.qkv is None:
            # one cat instead of a second RoPE (six dispatches)
            qk = torch.cat([self.q.forward(x), self.k.forward(x)], dim=-1)  # (..., q+kv out)
            v = self.v.forward(x)  # (..., kv_out)
        else:
            qkv = self.qkv.forward(x)  # (..., q_out + 2 * kv_out)
            qk, v = qkv[..., : q_out + kv_out], qkv[..., q_out + kv_out :]
        qk = qk.reshape(*lead, self.heads + self.kv_heads, dim)
        q, k = torch.split(apply_rope(qk, cos, sin), [self.heads, self.kv_heads], dim=-2)
        return q, k, v

    def _attend_rotated(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, part: RaggedPart, index: int
    ) -> torch.Tensor:
        """Attention of one sequence group's tokens after RoPE, against ``part.cache`` (which
        stores the new keys/values): ``q`` (batch, heads, seq, head_dim), ``k`` (batch,
        kv_heads, seq, head_dim), ``v`` (..., kv_heads*head_dim) with ``part.batch *
        part.seq`` tokens. Returns (batch*seq, heads*head_dim)."""
        batch, seq, dim = part.batch, part.seq, self.head_dim
        v = v.reshape(batch, seq, self.kv_heads, dim).transpose(1, 2)  # (batch, kv_heads, seq, d)
        if part.cache is not None:
            k, v = part.cache.update(index, k, v)  # (batch, kv_heads, total, head_dim)
        start = k.shape[2] - seq
        if seq == 1 or start == 0 or seq > ROW_BY_ROW_TOKENS:
            out = self._attend(q, k, v, part.mask)  # (batch, heads, seq, head_dim)
        else:
            # a few tokens after a cache (a speculative step, a short turn): each query as a
            # step of its own would attend, so a token's output does not depend on how many
            # came with it (quantized layers round to bfloat16, where any difference in a
            # sum's order can flip a greedy near-tie between a speculative and a plain run)
            rows = []
            for i in range(seq):
                mask = part.mask.mask
                row = None if mask is None else mask[:, :, i : i + 1, : start + i + 1]
                if row is not None and bool(row.all()):
                    row = None  # no padding: the causal part is all True for this query
                keys, values = k[:, :, : start + i + 1], v[:, :, : start + i + 1]
                rows.append(
                    self._attend(q[:, :, i : i + 1], keys, values, AttentionMask(row, False))
                )
            out = torch.cat(rows, dim=2)  # (batch, heads, seq, head_dim)
        return out.transpose(1, 2).reshape(batch * seq, self.heads * dim)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask
    ) -> torch.Tensor:
        """Attention of ``q`` (batch, heads, seq, head_dim) over ``k``/``v`` (batch, kv_heads,
        total, head_dim) under ``mask``. Returns (batch, heads, seq, head_dim)."""
        if q.shape[2] == 1 and q.device.type == "cpu" and q.dtype in HALF_DTYPES:
            return decode_attention(q, k, v, mask.mask)
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask.mask,
            is_causal=mask.is_causal,
            enable_gqa=self.kv_heads != self.heads,
        )

    def forward(self, x: torch.Tensor, ragged: RaggedBatch, index: int) -> torch.Tensor:
        """Attention over tokens of one or several independent groups laid end to end: ``x``
        (tokens, hidden) with ``sum(p.batch * p.seq)`` rows, in the order of
        ``ragged.parts``. The projections and RoPE run over all tokens at once; attention
        runs per group against that group's own cache (layer ``index`` of it), mask and
        positions. Returns (tokens, hidden)."""
        dim = self.head_dim
        q, k, v = self.project(x, ragged.cos, ragged.sin)  # (tokens, heads, head_dim), ...
        parts = ragged.parts
        if len(parts) == 1:  # one group (`Span.forward`): no split, no concatenation
            groups = [(q, k, v, parts[0])]
        else:
            sizes = [p.batch * p.seq for p in parts]
            splits = (torch.split(q, sizes), torch.split(k, sizes), torch.split(v, sizes))
            groups = list(zip(*splits, parts, strict=True))
        outs = []
        for qi, ki, vi, part in groups:
            qi = qi.view(part.batch, part.seq, self.heads, dim).transpose(1, 2)
            ki = ki.view(part.batch, part.seq, self.kv_heads, dim).transpose(1, 2)
            outs.append(self._attend_rotated(qi, ki, vi, part, index))  # (batch*seq, q_out)
        out = outs[0] if len(outs) == 1 else torch.cat(outs)  # (tokens, q_out)
        projected: torch.Tensor = self.o.forward(out)  # (tokens, hidden)
        return projected


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate = nn.Linear(hidden, inner, bias=bias)
        self.up = nn.Linear(hidden, inner, bias=bias)
        self.down = nn.Linear(inner, hidden, bias=bias)
        self.gate_up: QuantLinear | None = None  # gate and up side by side (`fuse_projections`)

    def fuse_projections(self) -> None:
        """Multiply gate and up as one quantized matrix (see `Attention.fuse_projections`)."""
        fused = fuse_linears([self.gate, self.up])
        if fused is not None:
            self.gate_up = fused
            del self.gate, self.up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is None:
            gate, up = self.gate.forward(x), self.up.forward(x)
        else:
            gate, up = self.gate_up.forward(x).chunk(2, dim=-1)  # (..., inner) each
        out: torch.Tensor = self.down.forward(F.silu(gate) * up)  # (..., hidden)
        return out


class Block(nn.Module):
    """One pre-norm decoder layer: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def fuse_projections(self) -> None:
        """Fuse the quantized projections that share an input (q/k/v, gate/up)."""
        self.attn.fuse_projections()
        self.mlp.fuse_projections()

    def forward(self, x: torch.Tensor, ragged: RaggedBatch, index: int) -> torch.Tensor:
        """The block over the tokens ``x`` (tokens, hidden) of one or several groups (see
        `Attention.forward`); same shape out."""
        # children's forward called directly: nn.Module.__call__'s hook checks cost ~1 us
        # a call (9 calls a layer), and nothing hooks these (a hook on the block still runs)
        x = x + self.attn.forward(self.attn_norm.forward(x), ragged, index)  # (tokens, hidden)
        out: torch.Tensor = x + self.mlp.forward(self.mlp_norm.forward(x))  # (tokens, hidden)
        return out
