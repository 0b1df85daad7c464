"""`decode_attention` (one query per row, used for half precision on the CPU) computes what
SDPA computes: grouped-query heads, padding masks, float32 math."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from swarm.shards.blocks import decode_attention


def _inputs(
    dtype: torch.dtype, heads: int, kv_heads: int, total: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(heads * 100 + total)
    q = torch.randn(3, heads, 1, 32, generator=gen).to(dtype)
    k = (2 * torch.randn(3, kv_heads, total, 32, generator=gen)).to(dtype)  # sharp scores
    v = torch.randn(3, kv_heads, total, 32, generator=gen).to(dtype)
    mask = torch.rand(3, 1, 1, total, generator=gen) > 0.3
    mask[..., -1] = True  # the new token sees itself
    return q, k, v, mask


@pytest.mark.parametrize(("heads", "kv_heads"), [(8, 8), (8, 2), (6, 1)])
@pytest.mark.parametrize("masked", [False, True])
def test_equals_sdpa_in_float32(heads: int, kv_heads: int, masked: bool) -> None:
    q, k, v, mask = _inputs(torch.float32, heads, kv_heads, 57)
    attn_mask = mask if masked else None
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True)
    got = decode_attention(q, k, v, attn_mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_float32_math_rounded_once(dtype: torch.dtype) -> None:
    """The only error against float32 attention of the same inputs is the output's
    rounding: within one unit in the last place of the half-precision result (the float32
    sums may land on either side of a rounding boundary)."""
    q, k, v, mask = _inputs(dtype, 8, 2, 300)
    want = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True
    )
    got = decode_attention(q, k, v, mask)
    assert got.dtype == dtype
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(got.float(), want, rtol=ulp, atol=ulp * 1e-3)
