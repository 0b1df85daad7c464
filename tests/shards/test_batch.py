"""`Span.forward_batch`: a ragged batch of sessions equals running each alone."""

from __future__ import annotations

import pytest
import torch

from swarm.errors import ShardError
from swarm.shards import KVCache, load_span
from swarm.shards.span import BatchItem, Span
from swarm.testing.checkpoints import write_random_llama
from swarm.types import LayerRange

HIDDEN = 64


@pytest.fixture(scope="module")
def span(tmp_path_factory: pytest.TempPathFactory) -> Span:
    path = tmp_path_factory.mktemp("batch") / "gqa"
    write_random_llama(path, num_layers=3, hidden=HIDDEN, heads=4, kv_heads=2, seed=5, std=0.1)
    return load_span(path, LayerRange(0, 3))


def _cache(span: Span, batch: int = 1) -> KVCache:
    return KVCache.allocate(span.config, span.layers, batch, 64)


def _positions(batch: int, start: int, seq: int) -> torch.Tensor:
    return torch.arange(start, start + seq).expand(batch, seq)  # (batch, seq)


def test_ragged_batch_equals_each_alone(span: Span) -> None:
    """Sessions at different lengths (one still in prefill, two decoding, a two-row
    session) plus a stateless forward, batched, give each what running it alone gives."""
    gen = torch.Generator().manual_seed(0)
    histories = [5, 17, 0, 9]  # tokens already cached; 0: this step is its prefill
    rows = [1, 1, 1, 2]
    new = [1, 1, 12, 1]
    alone_caches, batch_caches = [], []
    for n, r in zip(histories, rows, strict=True):
        a, b = _cache(span, r), _cache(span, r)
        if n:
            prompt = torch.randn(r, n, HIDDEN, generator=gen)
            with torch.no_grad():
                span(prompt, _positions(r, 0, n), a)
                span(prompt, _positions(r, 0, n), b)
        alone_caches.append(a)
        batch_caches.append(b)
    inputs = [torch.randn(r, s, HIDDEN, generator=gen) for r, s in zip(rows, new, strict=True)]
    stateless = torch.randn(1, 7, HIDDEN, generator=gen)
    with torch.no_grad():
        expected = [
            span(x, _positions(x.shape[0], n, x.shape[1]), c)
            for x, n, c in zip(inputs, histories, alone_caches, strict=True)
        ]
        expected.append(span(stateless, _positions(1, 0, 7)))
        items = [
            BatchItem(x, _positions(x.shape[0], n, x.shape[1]), c)
            for x, n, c in zip(inputs, histories, batch_caches, strict=True)
        ]
        got = span.forward_batch([*items, BatchItem(stateless, _positions(1, 0, 7), None)])
        for want, have in zip(expected, got, strict=True):
            assert have.shape == want.shape
            torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-5)
        for a, b in zip(alone_caches, batch_caches, strict=True):
            assert a.length == b.length
            torch.testing.assert_close(b.keys[2][:, :, : b.length], a.keys[2][:, :, : a.length])
        # the next decode step continues from the batched caches exactly as from the others
        step = torch.randn(1, 1, HIDDEN, generator=gen)
        pos = _positions(1, batch_caches[0].length, 1)
        torch.testing.assert_close(
            span.forward_batch([BatchItem(step, pos, batch_caches[0])])[0],
            span(step, pos, alone_caches[0]),
            rtol=1e-4,
            atol=1e-5,
        )


def test_bad_item_touches_no_cache(span: Span) -> None:
    full = KVCache.allocate(span.config, span.layers, 1, 2)
    fine = _cache(span)
    x = torch.randn(1, 3, HIDDEN)
    with pytest.raises(ShardError, match="full"):
        span.forward_batch(
            [BatchItem(x, _positions(1, 0, 3), fine), BatchItem(x, _positions(1, 0, 3), full)]
        )
    assert fine.length == 0 and full.length == 0
    with pytest.raises(ShardError, match="share a cache"):
        span.forward_batch([BatchItem(x, _positions(1, 0, 3), fine)] * 2)
