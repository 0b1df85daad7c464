"""KVCache: allocation, overflow, rollback, and misuse."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from swarm.errors import ShardError
from swarm.shards import KVCache, Span, load_span
from swarm.testing.checkpoints import write_random_llama
from swarm.types import LayerRange


@pytest.fixture(scope="module")
def span(tmp_path_factory: pytest.TempPathFactory) -> Span:
    path = write_random_llama(tmp_path_factory.mktemp("cache") / "m", num_layers=3, vocab=64)
    return load_span(path, LayerRange(1, 3))


def _pos(seq: int, start: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.arange(start, start + seq).expand(batch, seq)


def test_allocation_size(span: Span) -> None:
    cfg = span.config
    cache = KVCache.allocate(cfg, LayerRange(1, 3), batch_size=2, max_length=10)
    per_layer = 2 * 2 * cfg.num_key_value_heads * 10 * cfg.head_dim * 4  # k and v, float32
    assert cache.nbytes == 2 * per_layer + 2 * 10  # + the bool token mask
    assert cache.length == 0 and cache.max_length == 10 and cache.batch_size == 2


def test_step_past_max_length_is_refused(span: Span) -> None:
    cache = KVCache.allocate(span.config, span.layers, 1, 4)
    hidden = torch.randn(1, 4, 64)
    with torch.inference_mode():
        span(hidden, _pos(4), cache)
        with pytest.raises(
            ShardError, match=r"KV cache is full: 4 tokens stored \+ 1 new > max_length 4"
        ):
            span(hidden[:, :1], _pos(1, 4), cache)
    assert cache.length == 4


def test_truncate_rolls_back_steps(span: Span) -> None:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 8, 64, generator=gen)
    other = torch.randn(1, 3, 64, generator=gen)
    cache = KVCache.allocate(span.config, span.layers, 1, 8)
    with torch.inference_mode():
        span(hidden[:, :5], _pos(5), cache)
        span(other, _pos(3, 5), cache)  # steps to roll back
        cache.truncate(5)
        redo = span(hidden[:, 5:], _pos(3, 5), cache)
        expected = span(hidden, _pos(8))[:, 5:]
        torch.testing.assert_close(redo, expected, rtol=1e-5, atol=1e-6)
        cache.reset()
        assert cache.length == 0
        again = span(hidden, _pos(8), cache)
        torch.testing.assert_close(again[:, 5:], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ShardError, match="cannot truncate a cache of 8 tokens to 9"):
        cache.truncate(9)


def test_misuse_is_a_shard_error(span: Span, tmp_path: Path) -> None:
    cfg = span.config
    with torch.inference_mode():
        with pytest.raises(ShardError, match=r"cache is for layers 0:2"):
            span(torch.randn(1, 2, 64), _pos(2), KVCache.allocate(cfg, LayerRange(0, 2), 1, 4))
        with pytest.raises(ShardError, match="batch 2"):
            span(torch.randn(1, 2, 64), _pos(2), KVCache.allocate(cfg, LayerRange(1, 3), 2, 4))
        with pytest.raises(ShardError, match=r"hidden states must be \(batch, seq, 64\)"):
            span(torch.randn(1, 2, 32), _pos(2))
        with pytest.raises(ShardError, match="positions must be int64"):
            span(torch.randn(1, 2, 64), _pos(3))
        with pytest.raises(ShardError, match=r"this span runs torch\.float32"):
            span(torch.randn(1, 2, 64, dtype=torch.float16), _pos(2))
    with pytest.raises(ShardError, match="outside the model"):
        KVCache.allocate(cfg, LayerRange(2, 5), 1, 4)
    with pytest.raises(ShardError, match="max_length > 0"):
        KVCache.allocate(cfg, LayerRange(1, 3), 1, 0)


def test_runs_in_a_worker_thread(span: Span) -> None:
    import threading

    hidden = torch.randn(1, 3, 64)
    with torch.inference_mode():
        expected = span(hidden, _pos(3))
    result: list[torch.Tensor] = []

    def work() -> None:
        with torch.inference_mode():
            result.append(span(hidden, _pos(3)))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive()
    torch.testing.assert_close(result[0], expected, rtol=0, atol=0)


def test_clone_continues_like_the_original(span: Span) -> None:
    """A clone holds the same tokens in storage of its own: the next step on either gives
    the same output, and stepping one leaves the other as it was."""
    cache = KVCache.allocate(span.config, span.layers, 1, 8)
    with torch.inference_mode():
        span(torch.randn(1, 5, 64), _pos(5), cache)
        twin = cache.clone()
        step = torch.randn(1, 1, 64)
        mine = span(step, _pos(1, 5), cache)
        assert twin.length == 5 and cache.length == 6
        torch.testing.assert_close(span(step, _pos(1, 5), twin), mine, rtol=0, atol=0)
    assert all(k.data_ptr() != t.data_ptr() for k, t in zip(cache.keys, twin.keys, strict=True))
