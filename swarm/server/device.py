"""Where and in which dtype a server computes: `resolve_device` and `resolve_dtype`
(``--device`` and ``--dtype``, ``auto`` by default)."""

from __future__ import annotations

import torch

from swarm.errors import ConfigError
from swarm.server.capacity import cpu_has_native_bfloat16
from swarm.shards import ModelConfig
from swarm.types import FLOAT_DTYPES, torch_dtype

__all__ = ["resolve_device", "resolve_dtype"]


def resolve_device(name: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu or cuda[:n]") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available here")
    return device


def resolve_dtype(name: str, model: ModelConfig, device: torch.device) -> torch.dtype:
    """``auto``: the checkpoint's dtype on a GPU; on the CPU bfloat16 for a checkpoint
    stored in bfloat16 where the CPU has bfloat16 dot-product instructions (there a batched
    step of 8 sessions costs about 1.1-1.3x one step in the matmuls, against 2-3x in float32; see
    benchmarks/README.md), float32 otherwise (emulated half precision is slow)."""
    if name != "auto":
        return torch_dtype(name)
    if device.type == "cpu":
        if model.torch_dtype == "bfloat16" and cpu_has_native_bfloat16():
            return torch.bfloat16
        return torch.float32
    return torch_dtype(model.torch_dtype) if model.torch_dtype in FLOAT_DTYPES else torch.float16
