"""A tiny random Llama checkpoint written with our own writer (``swarm selfcheck`` runs one).

:func:`write_random_llama` writes a Hugging Face-format Llama folder (``config.json`` +
safetensors with HF tensor names), without ``transformers``; optionally sharded
(``layers_per_file``) with a ``model.safetensors.index.json``. Tests use it too (and
`swarm.testing.checkpoints` adds GGUF files and ``transformers``-made references).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

__all__ = ["layer_tensors", "randn", "write_random_llama"]


def write_random_llama(
    path: str | Path,
    *,
    num_layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = 256,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    layers_per_file: int | None = None,
    std: float = 0.02,
) -> Path:
    """Write a random ``LlamaForCausalLM`` checkpoint to ``path`` (created); return the path.

    With ``layers_per_file``, the layers are split over several ``model-XXXXX-of-YYYYY``
    files (embeddings in the first, final norm and lm_head in the last) plus an index.
    Memory: one file's tensors at a time.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    gen = torch.Generator().manual_seed(seed)
    per_file = layers_per_file or num_layers
    groups = [list(range(i, min(i + per_file, num_layers))) for i in range(0, num_layers, per_file)]
    weight_map: dict[str, str] = {}
    for g, layers in enumerate(groups):
        tensors: dict[str, torch.Tensor] = {}
        if g == 0:
            tensors["model.embed_tokens.weight"] = randn(gen, (vocab, hidden), std, dtype)
        for i in layers:
            tensors.update(layer_tensors(gen, i, hidden, heads, kv_heads, intermediate, std, dtype))
        if g == len(groups) - 1:
            tensors["model.norm.weight"] = torch.ones(hidden, dtype=dtype)
            tensors["lm_head.weight"] = randn(gen, (vocab, hidden), std, dtype)
        name = (
            "model.safetensors"
            if layers_per_file is None
            else f"model-{g + 1:05d}-of-{len(groups):05d}.safetensors"
        )
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    if layers_per_file is not None:
        index = {"metadata": {}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder


def layer_tensors(
    gen: torch.Generator,
    i: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    std: float,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    head_dim = hidden // heads
    p = f"model.layers.{i}."
    shapes = {
        "self_attn.q_proj.weight": (heads * head_dim, hidden),
        "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
        "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
        "self_attn.o_proj.weight": (hidden, heads * head_dim),
        "mlp.gate_proj.weight": (intermediate, hidden),
        "mlp.up_proj.weight": (intermediate, hidden),
        "mlp.down_proj.weight": (hidden, intermediate),
    }
    out = {p + name: randn(gen, shape, std, dtype) for name, shape in shapes.items()}
    out[p + "input_layernorm.weight"] = 1 + randn(gen, (hidden,), 0.1, dtype)
    out[p + "post_attention_layernorm.weight"] = 1 + randn(gen, (hidden,), 0.1, dtype)
    return out


def randn(
    gen: torch.Generator, shape: tuple[int, ...], std: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * std).to(dtype)
