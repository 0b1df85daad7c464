"""`model_id`: a model's name on the swarm, derived from its weights, never from its path.

``llama-135m-3f9c0a1b2d4e``: the architecture and parameter count (from the config), then 12
hex digits of a SHA-256 over the checked config, every tensor's name, stored type, shape and
size, and fixed samples of every tensor's bytes (the whole tensor when it is small, else
:data:`SAMPLES` windows of :data:`WINDOW` bytes spread evenly over it, first and last byte
included). So byte-identical checkpoints get the same id wherever they lie (and whatever
the folder is called), any retrained, fine-tuned or re-quantized weights get another, and
the cost stays small for large files: about ``tensors x SAMPLES x WINDOW`` bytes read
(32 KiB per tensor), not the whole file. A change confined to bytes between the samples is
not seen; that is the price of not reading gigabytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from swarm.errors import ShardError
from swarm.shards.checkpoint import TensorLayout, tensor_layout
from swarm.shards.config import ModelConfig

__all__ = ["SAMPLES", "WINDOW", "model_id", "parameter_count"]

SAMPLES = 8
WINDOW = 4096
_VERSION = b"swarm-model-id/1\n"


def model_id(path: str | Path) -> str:
    """``<architecture>-<size>-<12 hex digits>`` for the checkpoint at ``path`` (a Hugging
    Face folder or a GGUF file); see the module docstring for what the digest covers.

    Reads the headers and about 32 KiB per tensor.

    Raises:
        ShardError: the config is unsupported, or checkpoint files are missing or unreadable.
    """
    config = ModelConfig.from_pretrained(path)
    layout = tensor_layout(path)
    digest = hashlib.sha256(_VERSION)
    digest.update(_canonical(dataclasses.asdict(config)))
    handles: dict[Path, BinaryIO] = {}
    try:
        for name in sorted(layout):
            tensor = layout[name]
            digest.update(_canonical([name, tensor.dtype, list(tensor.shape), tensor.nbytes]))
            if tensor.file not in handles:
                handles[tensor.file] = tensor.file.open("rb")
            for chunk in _samples(handles[tensor.file], tensor):
                digest.update(chunk)
    except OSError as exc:
        raise ShardError(f"{path}: cannot read tensor bytes for the model id: {exc}") from exc
    finally:
        for handle in handles.values():
            handle.close()
    arch = config.architecture.removesuffix("ForCausalLM").lower()
    return f"{arch}-{_size_label(parameter_count(config))}-{digest.hexdigest()[:12]}"


def _samples(file: BinaryIO, tensor: TensorLayout) -> Iterator[bytes]:
    """The fixed byte windows of one tensor (all of it when it is at most SAMPLES windows)."""
    if tensor.nbytes <= SAMPLES * WINDOW:
        starts = [0]
        length = tensor.nbytes
    else:
        last = tensor.nbytes - WINDOW
        starts = [round(i * last / (SAMPLES - 1)) for i in range(SAMPLES)]
        length = WINDOW
    for start in starts:
        file.seek(tensor.offset + start)
        chunk = file.read(length)
        if len(chunk) != length:
            raise ShardError(f"{tensor.file}: truncated: tensor data ends before its header says")
        yield chunk


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def parameter_count(config: ModelConfig) -> int:
    """How many parameters the model has (embeddings, layers, final norm, lm_head unless tied)."""
    hidden, inner, hd = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    layer = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * inner + 2 * hidden
    if config.attention_bias or config.qkv_bias:
        layer += q + 2 * kv
    if config.attention_bias:
        layer += hidden
    if config.mlp_bias:
        layer += 2 * inner + hidden
    head = config.vocab_size * hidden * (1 if config.tie_word_embeddings else 2) + hidden
    return config.num_hidden_layers * layer + head


def _size_label(params: int) -> str:
    """``135m``, ``7.2b``, ``96k``: the parameter count for humans."""
    if params >= 10**9:
        return f"{params / 1e9:.1f}b"
    if params >= 10**6:
        return f"{round(params / 1e6)}m"
    return f"{max(1, round(params / 1e3))}k"
