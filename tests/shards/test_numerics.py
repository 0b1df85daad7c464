"""Our blocks against transformers: logits, composition, cache, greedy generation, batching."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from swarm.shards import KVCache, ModelConfig, load_head, load_span
from swarm.types import LayerRange
from tests.shards.conftest import VARIANTS

LAYERS = 4
VOCAB = 128


def _positions(batch: int, seq: int, start: int = 0) -> torch.Tensor:
    return torch.arange(start, start + seq).expand(batch, seq)  # (batch, seq)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers(
    name: str, checkpoints: dict[str, Path], reference_models: dict[str, torch.nn.Module]
) -> None:
    path = checkpoints[name]
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    head, span = load_head(path), load_span(path, LayerRange(0, LAYERS))
    with torch.inference_mode():
        ours = head.logits(span(head.embed(ids), _positions(2, 40)))  # (2, 40, vocab)
        theirs = reference_models[name](ids).logits
    assert ours.shape == (2, 40, VOCAB)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_variants_exercise_the_features(checkpoints: dict[str, Path]) -> None:
    configs = {name: ModelConfig.from_pretrained(path) for name, path in checkpoints.items()}
    assert configs["llama"].num_key_value_heads < configs["llama"].num_attention_heads
    scaled = configs["llama3-rope-headdim-bias"]
    assert scaled.rope_scaling is not None and scaled.rope_scaling.rope_type == "llama3"
    assert scaled.head_dim * scaled.num_attention_heads != scaled.hidden_size
    assert scaled.attention_bias and scaled.mlp_bias
    linear = configs["llama-linear-rope"].rope_scaling
    assert linear is not None and linear.rope_type == "linear"
    assert configs["qwen2"].qkv_bias and not configs["qwen2"].attention_bias
    assert configs["qwen2-tied"].tie_word_embeddings
    assert configs["llama-mha-tied"].tie_word_embeddings
    assert configs["mistral"].architecture == "MistralForCausalLM"


@pytest.mark.parametrize("k", [1, 2, 3])
def test_composition_equals_one_span(k: int, checkpoints: dict[str, Path]) -> None:
    path = checkpoints["llama"]
    hidden = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(k))
    pos = _positions(2, 12)
    whole = load_span(path, LayerRange(0, LAYERS))
    first, second = load_span(path, LayerRange(0, k)), load_span(path, LayerRange(k, LAYERS))
    with torch.inference_mode():
        expected = whole(hidden, pos)
        chained = second(first(hidden, pos), pos)
        narrowed = whole.narrow(LayerRange(k, LAYERS))(
            whole.narrow(LayerRange(0, k))(hidden, pos), pos
        )
    torch.testing.assert_close(chained, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(narrowed, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["llama", "llama3-rope-headdim-bias", "qwen2"])
def test_prefill_then_steps_equals_one_pass(name: str, checkpoints: dict[str, Path]) -> None:
    path = checkpoints[name]
    span = load_span(path, LayerRange(0, LAYERS))
    cfg = span.config
    prefill, steps = 7, 5
    hidden = torch.randn(
        2, prefill + steps, cfg.hidden_size, generator=torch.Generator().manual_seed(3)
    )
    cache = KVCache.allocate(cfg, span.layers, batch_size=2, max_length=16)
    with torch.inference_mode():
        expected = span(hidden, _positions(2, prefill + steps))
        outs = [span(hidden[:, :prefill], _positions(2, prefill), cache)]
        for t in range(prefill, prefill + steps):
            outs.append(span(hidden[:, t : t + 1], _positions(2, 1, t), cache))
    assert cache.length == prefill + steps
    torch.testing.assert_close(torch.cat(outs, dim=1), expected, rtol=1e-4, atol=1e-5)


def _greedy(
    path: Path, prompt: torch.Tensor, new_tokens: int, chunks: list[LayerRange]
) -> list[int]:
    """Greedy decoding through several spans, each with its own cache; EOS never chosen."""
    head = load_head(path)
    spans = [load_span(path, r) for r in chunks]
    caches = [KVCache.allocate(s.config, s.layers, 1, prompt.shape[1] + new_tokens) for s in spans]
    ids, pos, out = prompt, _positions(1, prompt.shape[1]), []
    with torch.inference_mode():
        for _ in range(new_tokens):
            hidden = head.embed(ids)
            for span, cache in zip(spans, caches, strict=True):
                hidden = span(hidden, pos, cache)
            logits = head.logits(hidden)[0, -1]  # (vocab,)
            logits[list(head.config.eos_token_id)] = float("-inf")  # as min_new_tokens does
            token = int(logits.argmax())
            out.append(token)
            ids, pos = torch.tensor([[token]]), pos[:, -1:] + 1
    return out


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2"])
def test_greedy_20_tokens_equal_transformers_generate(
    name: str, checkpoints: dict[str, Path], reference_models: dict[str, torch.nn.Module]
) -> None:
    prompt = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(5))
    ours = _greedy(checkpoints[name], prompt, 20, [LayerRange(0, 1), LayerRange(1, LAYERS)])
    with torch.inference_mode():
        theirs = (
            reference_models[name]
            .generate(  # type: ignore[operator]
                prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0
            )[0, 6:]
            .tolist()
        )
    assert ours == theirs
    assert len(set(ours)) > 1  # a constant answer would hide a broken cache


def test_batch_of_three_lengths_with_left_padding(
    checkpoints: dict[str, Path], reference_models: dict[str, torch.nn.Module]
) -> None:
    name = "llama"
    path, ref = checkpoints[name], reference_models[name]
    head, span = load_head(path), load_span(path, LayerRange(0, LAYERS))
    gen = torch.Generator().manual_seed(7)
    seqs = [torch.randint(3, VOCAB, (n,), generator=gen) for n in (5, 9, 12)]
    width = max(len(s) for s in seqs)
    ids = torch.zeros(3, width, dtype=torch.int64)
    mask = torch.zeros(3, width, dtype=torch.bool)
    for row, s in enumerate(seqs):
        ids[row, width - len(s) :] = s
        mask[row, width - len(s) :] = True
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (3, width)
    steps = torch.randint(3, VOCAB, (3, 3), generator=gen)  # 3 decode tokens per row
    cache = KVCache.allocate(span.config, span.layers, batch_size=3, max_length=width + 3)
    with torch.inference_mode():
        prefill = head.logits(span(head.embed(ids), pos, cache, mask))  # (3, width, vocab)
        uncached = head.logits(span(head.embed(ids), pos, attention_mask=mask))
        decoded = []
        for t in range(3):
            pos = pos[:, -1:] + 1  # (3, 1)
            decoded.append(head.logits(span(head.embed(steps[:, t : t + 1]), pos, cache)))
        for row, s in enumerate(seqs):
            full = torch.cat([s, steps[row]])[None]  # (1, len+3)
            expected = ref(full).logits[0]  # (len+3, vocab)
            n = len(s)
            torch.testing.assert_close(
                prefill[row, width - n :], expected[:n], rtol=1e-4, atol=1e-5
            )
            torch.testing.assert_close(
                uncached[row, width - n :], expected[:n], rtol=1e-4, atol=1e-5
            )
            got = torch.cat([d[row] for d in decoded])  # (3, vocab)
            torch.testing.assert_close(got, expected[n:], rtol=1e-4, atol=1e-5)
    assert torch.isfinite(prefill).all()  # padded positions are meaningless, but finite


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_float32(dtype: torch.dtype, checkpoints: dict[str, Path]) -> None:
    path = checkpoints["llama3-rope-headdim-bias"]
    ref, low = (
        load_span(path, LayerRange(0, LAYERS)),
        load_span(path, LayerRange(0, LAYERS), dtype=dtype),
    )
    assert low.dtype == dtype
    head = load_head(path)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(9))
    pos = _positions(2, 24)
    cache = KVCache.allocate(low.config, low.layers, 2, 24, dtype=dtype)
    with torch.inference_mode():
        hidden = head.embed(ids)
        expected = ref(hidden, pos)
        got = low(hidden.to(dtype), pos).float()
        cached = torch.cat(
            [low(hidden[:, :20].to(dtype), pos[:, :20], cache)]
            + [
                low(hidden[:, t : t + 1].to(dtype), pos[:, t : t + 1], cache) for t in range(20, 24)
            ],
            dim=1,
        ).float()
    for out in (got, cached):
        rel = (out - expected).norm() / expected.norm()
        assert rel < 1e-2, f"{dtype}: relative L2 error {rel:.2e}"
