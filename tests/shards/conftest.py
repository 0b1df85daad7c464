"""Tiny random checkpoints written once per test session with ``transformers``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from swarm.testing.checkpoints import make_tiny_checkpoint

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,  # small, so test positions cross every band
}

# name -> (arch, make_tiny_checkpoint keyword arguments)
VARIANTS: dict[str, tuple[str, dict[str, object]]] = {
    "llama": ("llama", {}),
    "llama-mha-tied": ("llama", {"kv_heads": 4, "tie_word_embeddings": True}),
    "llama3-rope-headdim-bias": (
        "llama",
        {
            "head_dim": 32,
            "rope_theta": 500000.0,
            "rope_scaling": LLAMA3_ROPE,
            "attention_bias": True,
            "mlp_bias": True,
        },
    ),
    "llama-linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "mistral": ("mistral", {"kv_heads": 1}),
    "qwen2": ("qwen2", {}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True, "kv_heads": 4}),
    "llama-sharded": ("llama", {"sharded": True}),
}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every variant in :data:`VARIANTS`, 4 layers each, written once."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        name: make_tiny_checkpoint(root / name, arch, seed=i, **kwargs)  # type: ignore[arg-type]
        for i, (name, (arch, kwargs)) in enumerate(VARIANTS.items())
    }


@pytest.fixture(scope="session")
def reference_models(checkpoints: dict[str, Path]) -> dict[str, torch.nn.Module]:
    """The transformers models of :func:`checkpoints`, loaded back from disk, float32."""
    from transformers import AutoModelForCausalLM

    return {
        name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for name, path in checkpoints.items()
    }
