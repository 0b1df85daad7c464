"""A 4-layer random checkpoint, its single-process greedy reference, and swarm helpers."""

from __future__ import annotations

from pathlib import Path

import pytest

from swarm.lab.reference import generate_locally
from swarm.testing.checkpoints import make_tiny_checkpoint

PROMPT = [5, 17, 30, 99, 42, 7, 64, 3]
NEW_TOKENS = 30
LAYERS = 4


def local_greedy(path: Path, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy generation with our shards in this process (what honest peers produce)."""
    return generate_locally(path, prompt, new_tokens).ids


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
