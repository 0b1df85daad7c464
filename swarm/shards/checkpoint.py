"""Reading a Hugging Face safetensors checkpoint: which file holds which tensor, and only those.

:func:`checkpoint_names` is the one place that knows the checkpoint's tensor names.
:func:`read_tensors` opens only the files holding the requested names and reads only those
tensors (``safe_open(...).get_tensor``), checking each shape before reading its data.
:func:`model_id` names a model on the swarm from its config and tensor index.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from swarm.errors import ShardError
from swarm.shards.config import ModelConfig
from swarm.types import LayerRange

__all__ = [
    "SHARD_INDEX",
    "SINGLE_FILE",
    "checkpoint_names",
    "model_id",
    "read_tensors",
    "tensor_files",
    "tensor_index",
]

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
_MAX_HEADER = 100 * 1024 * 1024

# Our per-layer parameter names -> the checkpoint's, for layer i under "model.layers.{i}.".
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q.weight": "self_attn.q_proj.weight",
    "attn.k.weight": "self_attn.k_proj.weight",
    "attn.v.weight": "self_attn.v_proj.weight",
    "attn.o.weight": "self_attn.o_proj.weight",
    "attn.q.bias": "self_attn.q_proj.bias",
    "attn.k.bias": "self_attn.k_proj.bias",
    "attn.v.bias": "self_attn.v_proj.bias",
    "attn.o.bias": "self_attn.o_proj.bias",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
    "mlp.gate.bias": "mlp.gate_proj.bias",
    "mlp.up.bias": "mlp.up_proj.bias",
    "mlp.down.bias": "mlp.down_proj.bias",
}
_HEAD_NAMES = {
    "embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def checkpoint_names(our_keys: list[str], *, layers: LayerRange | None = None) -> dict[str, str]:
    """Map our ``state_dict`` keys to checkpoint tensor names.

    With ``layers``, keys look like ``blocks.<j>.<param>`` where block ``j`` is model layer
    ``layers.start + j``; without, they are the head's (``embeddings.weight``, ``norm.weight``,
    ``lm_head.weight``).

    Raises:
        ShardError: a key has no checkpoint name (a bug in our modules, reported clearly).
    """
    names = {}
    for key in our_keys:
        if layers is not None:
            _, j, param = key.split(".", 2)
            ckpt = _LAYER_NAMES.get(param)
            name = None if ckpt is None else f"model.layers.{layers.start + int(j)}.{ckpt}"
        else:
            name = _HEAD_NAMES.get(key)
        if name is None:
            raise ShardError(f"no checkpoint tensor name for parameter {key!r}")
        names[key] = name
    return names


def tensor_files(path: str | Path) -> dict[str, Path]:
    """Which file holds each tensor: from the shard index, or every tensor of the single file.

    Reads only JSON (the index, or the single file's header), no tensor data.

    Raises:
        ShardError: neither ``model.safetensors`` nor a readable index is in the folder, or a
            file the index names is missing.
    """
    folder = Path(path)
    single, index = folder / SINGLE_FILE, folder / SHARD_INDEX
    if single.is_file():
        return dict.fromkeys(_read_header(single), single)
    if not index.is_file():
        raise ShardError(f"{folder}: neither {SINGLE_FILE} nor {SHARD_INDEX} found")
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ShardError(f"{index}: not a valid safetensors index: {exc}") from exc
    if not isinstance(weight_map, dict):
        raise ShardError(f"{index}: weight_map is not an object")
    files = {name: folder / str(file) for name, file in weight_map.items()}
    for file in set(files.values()):
        if not file.is_file():
            raise ShardError(f"{index} names {file.name}, which is missing")
    return files


def tensor_index(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` of every tensor, read from safetensors headers only.

    Raises:
        ShardError: as :func:`tensor_files`, or a header is unreadable.
    """
    index: dict[str, tuple[str, tuple[int, ...]]] = {}
    files = tensor_files(path)
    for file in sorted(set(files.values())):
        for name, (dtype, shape) in _read_header(file).items():
            if files.get(name) == file:
                index[name] = (dtype, shape)
    return index


def _read_header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Parse a safetensors header (8-byte little-endian length, then JSON)."""
    try:
        with file.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > _MAX_HEADER:
                raise ShardError(f"{file}: safetensors header of {size} bytes is too large")
            header = json.loads(f.read(size))
        return {
            name: (str(meta["dtype"]), tuple(int(d) for d in meta["shape"]))
            for name, meta in header.items()
            if name != "__metadata__"
        }
    except (OSError, struct.error, ValueError, KeyError, TypeError) as exc:
        raise ShardError(f"{file}: not a readable safetensors file: {exc}") from exc


def read_tensors(
    path: str | Path,
    wanted: Mapping[str, tuple[int, ...]],
    convert: Callable[[torch.Tensor], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Read the tensors named in ``wanted`` (name -> expected shape), each passed through
    ``convert`` (dtype/device) right after it is read, so only one raw tensor is alive at once.

    Opens only the files that hold these names.

    Raises:
        ShardError: a tensor is missing, has another shape, or a file cannot be read.
    """
    files = tensor_files(path)
    missing = [name for name in wanted if name not in files]
    if missing:
        raise ShardError(f"{path}: checkpoint has no tensor {missing[0]!r}")
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        by_file.setdefault(files[name], []).append(name)
    out: dict[str, torch.Tensor] = {}
    for file, names in sorted(by_file.items()):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in names:
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != tuple(wanted[name]):
                        raise ShardError(
                            f"{file.name}: tensor {name!r} has shape {list(shape)}, "
                            f"expected {list(wanted[name])}"
                        )
                    out[name] = convert(f.get_tensor(name))
        except ShardError:
            raise
        except Exception as exc:  # safetensors raises its own error types and OSError
            raise ShardError(f"{file}: cannot read tensors: {exc}") from exc
    return out


def model_id(path: str | Path) -> str:
    """``<folder name, sanitized>-<12 hex digits>``: a readable name plus a short SHA-256 of
    the parsed ``config.json`` and the tensor index (names, dtypes, shapes; headers only).

    Two folders with the same name but other weights layout or config get different ids.

    Raises:
        ShardError: config or checkpoint files are missing or unreadable.
    """
    folder = Path(path).resolve()
    ModelConfig.from_pretrained(folder)  # refuses unsupported models with a clear message
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    index = sorted(
        (name, dtype, list(shape)) for name, (dtype, shape) in tensor_index(folder).items()
    )
    digest = hashlib.sha256()
    digest.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    digest.update(json.dumps(index, separators=(",", ":")).encode())
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", folder.name).strip("-.") or "model"
    return f"{name}-{digest.hexdigest()[:12]}"
