"""Write any checkpoint swarm reads (a GGUF file, a folder) as a Hugging Face folder.

``write_folder(src, dst)`` dequantizes every tensor once (to ``dtype``, float32 by default)
and writes ``config.json``, ``model.safetensors`` (transformers' tensor names),
``tokenizer.json``, ``tokenizer_config.json`` (with the chat template and special tokens)
and ``generation_config.json`` (the end-of-turn ids). Served by swarm or loaded by
transformers, the folder gives the same logits as ``src`` (within ``dtype``).

Costs the whole model's size in memory and on disk, once; the layers are read a range at a
time. RoPE stored as per-frequency factors (a Llama 3.1 GGUF) has no Hugging Face config
form and is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from swarm.errors import ShardError
from swarm.shards.chat_template import load_chat_template
from swarm.shards.checkpoint import checkpoint_names
from swarm.shards.config import ModelConfig
from swarm.shards.head import load_head
from swarm.shards.span import load_span
from swarm.shards.tokenizer import load_tokenizer
from swarm.types import LayerRange

__all__ = ["hf_config", "write_folder"]

_LAYERS_AT_ONCE = 4


def hf_config(config: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """``config.json`` for ``config`` as transformers writes it. Raises `ShardError` for a
    RoPE scaling that has no such form."""
    scaling: dict[str, Any] | None = None
    rope = config.rope_scaling
    if rope is not None and rope.rope_type == "factors":
        raise ShardError("RoPE given as per-frequency factors has no config.json form")
    if rope is not None:
        scaling = {"rope_type": rope.rope_type, "factor": rope.factor}
        if rope.rope_type == "llama3":
            scaling.update(
                low_freq_factor=rope.low_freq_factor,
                high_freq_factor=rope.high_freq_factor,
                original_max_position_embeddings=rope.original_max_position_embeddings,
            )
    model_type = config.architecture.removesuffix("ForCausalLM").lower()
    eos: int | list[int] = (
        config.eos_token_id[0] if len(config.eos_token_id) == 1 else list(config.eos_token_id)
    )
    return {
        "architectures": [config.architecture],
        "model_type": model_type,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": scaling,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_bias,
        "mlp_bias": config.mlp_bias,
        "max_position_embeddings": config.max_position_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "hidden_act": "silu",
    }


def write_folder(src: str | Path, dst: str | Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``src`` as a Hugging Face folder at ``dst`` (created; must not hold a model).

    Raises `ShardError` when ``src`` cannot be read or ``dst`` already holds a checkpoint.
    """
    out = Path(dst)
    if (out / "config.json").exists() or (out / "model.safetensors").exists():
        raise ShardError(f"{out} already holds a checkpoint; give an empty folder")
    config = ModelConfig.from_pretrained(src)
    tensors = _hf_tensors(src, config, dtype)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(config, dtype), indent=2))
    _write_tokenizer(src, out, config)
    return out


def _hf_tensors(src: str | Path, config: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    head = load_head(src, dtype=dtype)
    head_state = head.state_dict()
    names = checkpoint_names(list(head_state), gguf=False)
    tensors = {names[k]: t.contiguous() for k, t in head_state.items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # transformers ties it to the embeddings
    total = config.num_hidden_layers
    for start in range(0, total, _LAYERS_AT_ONCE):
        layers = LayerRange(start, min(start + _LAYERS_AT_ONCE, total))
        span = load_span(src, layers, dtype=dtype)
        state = {k: t for k, t in span.state_dict().items() if k.startswith("blocks.")}
        mapped = checkpoint_names(list(state), layers=layers, gguf=False)
        tensors.update({mapped[k]: t.contiguous() for k, t in state.items()})
    return tensors


def _write_tokenizer(src: str | Path, out: Path, config: ModelConfig) -> None:
    tokenizer = load_tokenizer(src)
    template = load_chat_template(src)
    if tokenizer is not None:
        tokenizer.save(str(out / "tokenizer.json"))
    settings: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if template is not None:
        settings.update(
            chat_template=template.source,
            bos_token=template.bos_token or None,
            eos_token=template.eos_token or None,
        )
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
    generation = {"eos_token_id": list(config.eos_token_id), "bos_token_id": config.bos_token_id}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
