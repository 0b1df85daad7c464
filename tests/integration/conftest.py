"""A 12-layer random checkpoint and the two references the swarm must match."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from swarm.lab.reference import generate_locally
from swarm.testing.checkpoints import make_tiny_checkpoint

PROMPT = [5, 17, 30, 99, 42, 7, 64, 3]
NEW_TOKENS = 32


def local_greedy(path: Path, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy generation with our shards in this process (the single-node baseline)."""
    return generate_locally(path, prompt, new_tokens).ids


def transformers_greedy(path: Path, prompt: list[int], new_tokens: int) -> list[int]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=new_tokens,
            do_sample=False,
            min_new_tokens=new_tokens,
            pad_token_id=0,
        )
    return [int(t) for t in out[0, len(prompt) :]]


@pytest.fixture(scope="session")
def model12(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # eos 127: the prompt's greedy continuation does not reach it within NEW_TOKENS
    # (checked by the `reference` fixture), so every path generates all tokens.
    path = tmp_path_factory.mktemp("model12") / "tiny12"
    return make_tiny_checkpoint(
        path, num_layers=12, hidden=64, vocab=128, seed=11, eos_token_id=127
    )


@pytest.fixture(scope="session")
def reference(model12: Path) -> list[int]:
    ours = local_greedy(model12, PROMPT, NEW_TOKENS)
    assert 127 not in ours, "pick another seed: the reference reaches EOS"
    assert ours == transformers_greedy(model12, PROMPT, NEW_TOKENS)
    return ours
