"""Our Llama-family decoder block: RMSNorm, attention with RoPE and GQA, SwiGLU MLP.

The modules hold parameters only; the KV cache is passed in (see :mod:`swarm.shards.cache`).
Submodule names are ours; :func:`swarm.shards.checkpoint.checkpoint_names` maps them to the
checkpoint's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from swarm.shards.cache import KVCache
from swarm.shards.config import ModelConfig
from swarm.shards.rope import apply_rope

__all__ = ["AttentionMask", "Block", "RMSNorm", "RaggedPart", "build_attention_mask"]


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 and cast back (as Llama does)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)  # (..., size)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., size)
        return self.weight * h.to(dtype)


@dataclass(frozen=True)
class AttentionMask:
    """What to hand to SDPA: an explicit boolean mask (batch, 1, seq, total) or a causal flag."""

    mask: torch.Tensor | None
    is_causal: bool


@dataclass(frozen=True)
class RaggedPart:
    """One group of a ragged batch: ``batch`` rows of ``seq`` new tokens, their RoPE angles
    ``cos``/``sin`` (batch, 1, seq, head_dim), attention pattern and cache (or None)."""

    batch: int
    seq: int
    cos: torch.Tensor
    sin: torch.Tensor
    mask: AttentionMask
    cache: KVCache | None


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

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: AttentionMask,
        cache: KVCache | None,
        index: int,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        part = RaggedPart(batch, seq, cos, sin, mask, cache)
        out = self.attend(self.q(x), self.k(x), self.v(x), part, index)  # (batch*seq, q_out)
        projected: torch.Tensor = self.o(out.view(batch, seq, -1))  # (batch, seq, hidden)
        return projected

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, part: RaggedPart, index: int
    ) -> torch.Tensor:
        """Attention of one sequence group's projected tokens: ``q`` (..., heads*head_dim),
        ``k``/``v`` (..., kv_heads*head_dim) with ``part.batch * part.seq`` tokens, against
        ``part.cache`` (which stores the new keys/values). Returns (batch*seq, heads*head_dim)."""
        batch, seq, dim = part.batch, part.seq, self.head_dim
        q = q.reshape(batch, seq, self.heads, dim).transpose(1, 2)
        k = k.reshape(batch, seq, self.kv_heads, dim).transpose(1, 2)
        v = v.reshape(batch, seq, self.kv_heads, dim).transpose(1, 2)
        # q: (batch, heads, seq, head_dim); k, v: (batch, kv_heads, seq, head_dim)
        q = apply_rope(q, part.cos, part.sin)
        k = apply_rope(k, part.cos, part.sin)
        if part.cache is not None:
            k, v = part.cache.update(index, k, v)  # (batch, kv_heads, total, head_dim)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=part.mask.mask,
            is_causal=part.mask.is_causal,
            enable_gqa=self.kv_heads != self.heads,
        )  # (batch, heads, seq, head_dim)
        return out.transpose(1, 2).reshape(batch * seq, self.heads * dim)

    def forward_ragged(
        self, x: torch.Tensor, parts: Sequence[RaggedPart], index: int
    ) -> torch.Tensor:
        """Attention over tokens of several independent groups laid end to end: ``x``
        (tokens, hidden) with ``sum(p.batch * p.seq)`` rows, in the order of ``parts``. The
        projections run over all tokens at once; attention runs per group against that
        group's own cache, mask and positions. Returns (tokens, hidden)."""
        q, k, v = self.q(x), self.k(x), self.v(x)  # (tokens, q_out), (tokens, kv_out) x2
        sizes = [p.batch * p.seq for p in parts]
        outs = [
            self.attend(qi, ki, vi, part, index)  # (batch*seq, q_out)
            for qi, ki, vi, part in zip(
                q.split(sizes), k.split(sizes), v.split(sizes), parts, strict=True
            )
        ]
        projected: torch.Tensor = self.o(torch.cat(outs))  # (tokens, hidden)
        return projected


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate = nn.Linear(hidden, inner, bias=bias)
        self.up = nn.Linear(hidden, inner, bias=bias)
        self.down = nn.Linear(inner, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down(F.silu(self.gate(x)) * self.up(x))  # (batch, seq, hidden)
        return out


class Block(nn.Module):
    """One pre-norm decoder layer: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: AttentionMask,
        cache: KVCache | None,
        index: int,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, index)  # (batch, seq, hidden)
        out: torch.Tensor = x + self.mlp(self.mlp_norm(x))  # (batch, seq, hidden)
        return out

    def forward_ragged(
        self, x: torch.Tensor, parts: Sequence[RaggedPart], index: int
    ) -> torch.Tensor:
        """The block over a ragged batch ``x`` (tokens, hidden) (see
        `Attention.forward_ragged`); same shape out."""
        x = x + self.attn.forward_ragged(self.attn_norm(x), parts, index)  # (tokens, hidden)
        out: torch.Tensor = x + self.mlp(self.mlp_norm(x))  # (tokens, hidden)
        return out
