"""The bundled demo model: complete, small, trained, and equal under transformers and our shards."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

import swarm
from swarm.shards import ModelConfig, load_head, load_span
from swarm.types import LayerRange

DEMO = Path(swarm.__file__).parent / "assets" / "models" / "swarm-demo"
FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "README.md",
)
PROMPT = "The list is a mutable sequence type. To add an item to the end of a list, use"
ROUND_TRIP = (
    "def f(x):\n    return x ** 2  # square\n",
    "Unicode: naïve café, 東京, emoji 🐍, tabs\tand  double  spaces.\n",
    "",
)


@pytest.fixture(scope="module")
def hf_model() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt_ids() -> torch.Tensor:
    tok = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    return torch.tensor([tok.encode(PROMPT).ids])  # (1, seq)


def test_folder_is_complete_and_small() -> None:
    assert sorted(p.name for p in DEMO.iterdir()) == sorted(FILES)
    total = sum(p.stat().st_size for p in DEMO.iterdir())
    assert total < 25 * 2**20


def test_config_is_a_small_llama() -> None:
    raw = json.loads((DEMO / "config.json").read_text())
    assert raw["architectures"] == ["LlamaForCausalLM"]
    config = ModelConfig.from_pretrained(DEMO)
    assert 4096 <= config.vocab_size <= 8192
    from safetensors import safe_open

    with safe_open(DEMO / "model.safetensors", framework="pt") as f:
        params = sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    assert 5_000_000 <= params <= 20_000_000


def test_tokenizer_round_trips_text() -> None:
    tok = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    assert tok.get_vocab_size() == ModelConfig.from_pretrained(DEMO).vocab_size
    for text in ROUND_TRIP:
        assert tok.decode(tok.encode(text).ids) == text


def test_transformers_tokenizer_matches_tokenizers() -> None:
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(DEMO)
    tok = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    assert hf_tok(PROMPT)["input_ids"] == tok.encode(PROMPT).ids
    assert hf_tok.eos_token == "<|endoftext|>"
    assert hf_tok.decode(hf_tok(ROUND_TRIP[1])["input_ids"]) == ROUND_TRIP[1]


def test_transformers_logits_match_our_shards(
    hf_model: torch.nn.Module, prompt_ids: torch.Tensor
) -> None:
    with torch.no_grad():
        expected = hf_model(prompt_ids).logits  # (1, seq, vocab)
    layers = ModelConfig.from_pretrained(DEMO).num_hidden_layers
    middle = layers // 2
    head = load_head(DEMO)
    first, second = (
        load_span(DEMO, LayerRange(0, middle)),
        load_span(DEMO, LayerRange(middle, layers)),
    )
    positions = torch.arange(prompt_ids.shape[1]).unsqueeze(0)  # (1, seq)
    with torch.no_grad():
        hidden = head.embed(prompt_ids)  # (1, seq, hidden)
        hidden = second(first(hidden, positions), positions)  # (1, seq, hidden)
        ours = head.logits(hidden)  # (1, seq, vocab)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_weights_are_trained(hf_model: torch.nn.Module, prompt_ids: torch.Tensor) -> None:
    """A random model scores about ln(vocab) ≈ 8.7 nats per token on English; ours far less."""
    with torch.no_grad():
        loss = hf_model(prompt_ids, labels=prompt_ids).loss
    assert float(loss) < 5.0


def test_model_card_names_source_license_and_results() -> None:
    card = (DEMO / "README.md").read_text()
    for needle in ("python3.11-doc", "PSF", "unigram", "bits per byte", "seed"):
        assert needle in card
