"""A 4-layer random checkpoint, its single-process greedy reference, and swarm helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from swarm.shards import KVCache, LayerRange, load_head, load_span
from swarm.testing.checkpoints import make_tiny_checkpoint

PROMPT = [5, 17, 30, 99, 42, 7, 64, 3]
NEW_TOKENS = 30
LAYERS = 4


def local_greedy(path: Path, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy generation with our shards in this process (what honest peers produce)."""
    head = load_head(path)
    span = load_span(path, LayerRange(0, LAYERS))
    cache = KVCache.allocate(span.config, span.layers, 1, len(prompt) + new_tokens)
    ids = torch.tensor([prompt])
    out: list[int] = []
    position = 0
    with torch.no_grad():
        for _ in range(new_tokens):
            n = ids.shape[1]
            hidden = span(head.embed(ids), torch.arange(position, position + n).view(1, n), cache)
            position += n
            token = int(head.logits(hidden[:, -1:])[0, -1].argmax())
            out.append(token)
            ids = torch.tensor([[token]])
    return out


@pytest.fixture(scope="session")
def model4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("verify") / "tiny4"
    return make_tiny_checkpoint(
        path, num_layers=LAYERS, hidden=64, vocab=128, seed=5, eos_token_id=127
    )


@pytest.fixture(scope="session")
def reference(model4: Path) -> list[int]:
    ours = local_greedy(model4, PROMPT, NEW_TOKENS)
    assert 127 not in ours, "pick another seed: the reference reaches EOS"
    return ours
