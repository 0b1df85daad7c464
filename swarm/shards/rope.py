"""Rotary position embeddings as free functions (``default``, ``linear``, ``llama3``, and
per-frequency ``factors``).

The arithmetic follows ``transformers``' Llama exactly (inverse frequencies and angles in
float32, cos/sin cast to the activations' dtype, ``rotate_half`` convention), so that our
logits match it to float32 rounding.
"""

from __future__ import annotations

import math

import torch

from swarm.shards.config import ModelConfig

__all__ = ["apply_rope", "inverse_frequencies", "rope_cos_sin"]


def inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """Per-pair inverse frequencies, scaled per ``config.rope_scaling``. Shape (head_dim // 2,),
    on the CPU (also inside ``torch.device("meta")``: there a division runs through PyTorch's
    reference implementations, whose first use imports torch._dynamo, seconds of start-up)."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)  # (head_dim/2,)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "factors":  # llama.cpp's rope_freqs: theta_i / factor_i
        factors = torch.tensor(scaling.frequency_factors, dtype=torch.float32, device="cpu")
        return inv_freq / factors
    return _llama3_scale(inv_freq, config)


def _llama3_scale(inv_freq: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by ``factor``, a smooth blend in between."""
    s = config.rope_scaling
    assert s is not None  # our own invariant: only called for llama3 scaling
    old_len = s.original_max_position_embeddings
    low_freq_wavelen = old_len / s.low_freq_factor
    high_freq_wavelen = old_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq  # (head_dim/2,)
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and the signed sin for ``positions`` (batch, seq) int64; each (batch, seq, 1,
    head_dim), the layout `apply_rope` takes. The signed sin is sin with its first half
    negated (``rotate_half``'s minus sign moved onto the angles, once per step instead of
    once per layer)."""
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (batch, seq, head_dim/2)
    emb = torch.cat((angles, angles), dim=-1)  # (batch, seq, head_dim)
    cos = emb.cos().to(dtype)[:, :, None]  # (batch, seq, 1, head_dim)
    sin = emb.sin().to(dtype)  # (batch, seq, head_dim)
    half = sin.shape[-1] // 2
    signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)[:, :, None]
    return cos, signed_sin  # (batch, seq, 1, head_dim) each


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (..., heads, head_dim) by the angles in ``cos``/``signed_sin``
    (..., 1, head_dim) from `rope_cos_sin`: ``x * cos + rotate_half(x) * sin`` with
    ``rotate_half(x) = cat(-x2, x1)``, computed as ``x * cos + cat(x2, x1) * signed_sin``
    (bit for bit the same products: only where the sign sits moves), in four kernels."""
    rolled = torch.roll(x, x.shape[-1] // 2, dims=-1)  # cat(x2, x1): (..., heads, head_dim)
    return x * cos + rolled * signed_sin
