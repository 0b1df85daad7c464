"""Reading a checkpoint's tensors: which file holds which tensor, and only those.

Two formats: a Hugging Face safetensors folder, and a GGUF file (read by
:mod:`swarm.shards.gguf`). :func:`checkpoint_names` is the one place that knows the tensor
names of both. :func:`read_tensors` opens only the files holding the requested names and reads
only those tensors (``safe_open(...).get_tensor``, or the GGUF file's memory map), checking
each shape before reading its data. :func:`tensor_layout` says where every tensor's bytes lie,
from the headers only (for :func:`swarm.shards.fingerprint.model_id`).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from swarm.errors import ShardError
from swarm.shards.gguf import gguf_tensor_infos, read_gguf_int4, read_gguf_tensors
from swarm.shards.gguf_header import is_gguf
from swarm.shards.quant import Quantization, QuantLinear, quantize_linear
from swarm.types import LayerRange

__all__ = [
    "SHARD_INDEX",
    "SINGLE_FILE",
    "TensorLayout",
    "checkpoint_names",
    "layer_matrix_types",
    "read_quantized",
    "read_tensors",
    "tensor_files",
    "tensor_index",
    "tensor_layout",
]

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
_MAX_HEADER = 100 * 1024 * 1024

# Our per-layer parameter names -> (Hugging Face name under "model.layers.{i}.",
# GGUF name under "blk.{i}.").
_LAYER_NAMES = {
    "attn_norm.weight": ("input_layernorm.weight", "attn_norm.weight"),
    "attn.q.weight": ("self_attn.q_proj.weight", "attn_q.weight"),
    "attn.k.weight": ("self_attn.k_proj.weight", "attn_k.weight"),
    "attn.v.weight": ("self_attn.v_proj.weight", "attn_v.weight"),
    "attn.o.weight": ("self_attn.o_proj.weight", "attn_output.weight"),
    "attn.q.bias": ("self_attn.q_proj.bias", "attn_q.bias"),
    "attn.k.bias": ("self_attn.k_proj.bias", "attn_k.bias"),
    "attn.v.bias": ("self_attn.v_proj.bias", "attn_v.bias"),
    "attn.o.bias": ("self_attn.o_proj.bias", "attn_output.bias"),
    "mlp_norm.weight": ("post_attention_layernorm.weight", "ffn_norm.weight"),
    "mlp.gate.weight": ("mlp.gate_proj.weight", "ffn_gate.weight"),
    "mlp.up.weight": ("mlp.up_proj.weight", "ffn_up.weight"),
    "mlp.down.weight": ("mlp.down_proj.weight", "ffn_down.weight"),
    "mlp.gate.bias": ("mlp.gate_proj.bias", "ffn_gate.bias"),
    "mlp.up.bias": ("mlp.up_proj.bias", "ffn_up.bias"),
    "mlp.down.bias": ("mlp.down_proj.bias", "ffn_down.bias"),
}
_HEAD_NAMES = {
    "embeddings.weight": ("model.embed_tokens.weight", "token_embd.weight"),
    "norm.weight": ("model.norm.weight", "output_norm.weight"),
    "lm_head.weight": ("lm_head.weight", "output.weight"),
}


def checkpoint_names(
    our_keys: list[str], *, layers: LayerRange | None = None, gguf: bool = False
) -> dict[str, str]:
    """Map our ``state_dict`` keys to checkpoint tensor names (GGUF names with ``gguf``).

    With ``layers``, keys look like ``blocks.<j>.<param>`` where block ``j`` is model layer
    ``layers.start + j``; without, they are the head's (``embeddings.weight``, ``norm.weight``,
    ``lm_head.weight``).

    Raises:
        ShardError: a key has no checkpoint name (a bug in our modules, reported clearly).
    """
    which = 1 if gguf else 0
    prefix = "blk" if gguf else "model.layers"
    names = {}
    for key in our_keys:
        name: str | None
        if layers is not None:
            _, j, param = key.split(".", 2)
            pair = _LAYER_NAMES.get(param)
            name = None if pair is None else f"{prefix}.{layers.start + int(j)}.{pair[which]}"
        else:
            pair = _HEAD_NAMES.get(key)
            name = None if pair is None else pair[which]
        if name is None:
            raise ShardError(f"no checkpoint tensor name for parameter {key!r}")
        names[key] = name
    return names


def layer_matrix_types(path: str | Path) -> set[str]:
    """The stored types (``"Q4_1"``, ``"F32"``, ...) of the layers' projection matrices, from
    the header only; a safetensors folder's are its dtypes (``"F32"``, ``"BF16"``)."""
    gguf_names = {pair[1] for key, pair in _LAYER_NAMES.items() if key.endswith(".weight")
                  and "norm" not in key}  # fmt: skip
    hf_names = {pair[0] for key, pair in _LAYER_NAMES.items() if key.endswith(".weight")
                and "norm" not in key}  # fmt: skip
    names = gguf_names if is_gguf(path) else hf_names
    return {t.dtype for name, t in tensor_layout(path).items() if name.split(".", 2)[-1] in names
            or name.split(".", 3)[-1] in names}  # fmt: skip


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


@dataclass(frozen=True)
class TensorLayout:
    """Where one tensor's bytes lie: ``file``, the absolute byte ``offset`` in it, ``nbytes``;
    ``dtype`` is the stored type's name (safetensors ``"F32"``, GGUF ``"Q4_1"``) and ``shape``
    is in PyTorch order."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def tensor_index(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` of every tensor, read from the headers only.

    Raises:
        ShardError: as :func:`tensor_files`, or a header is unreadable.
    """
    return {name: (t.dtype, t.shape) for name, t in tensor_layout(path).items()}


def tensor_layout(path: str | Path) -> dict[str, TensorLayout]:
    """Every tensor's :class:`TensorLayout`, from safetensors headers or the GGUF header only.

    Raises:
        ShardError: as :func:`tensor_files`, or a header is unreadable.
    """
    if is_gguf(path):
        file = Path(path)
        return {
            name: TensorLayout(file, t.type_name, t.shape, t.offset, t.nbytes)
            for name, t in gguf_tensor_infos(path).items()
        }
    layout: dict[str, TensorLayout] = {}
    files = tensor_files(path)
    for file in sorted(set(files.values())):
        for name, entry in _read_header(file).items():
            if files.get(name) == file:
                layout[name] = entry
    return layout


def _read_header(file: Path) -> dict[str, TensorLayout]:
    """Parse a safetensors header (8-byte little-endian length, then JSON)."""
    try:
        with file.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > _MAX_HEADER:
                raise ShardError(f"{file}: safetensors header of {size} bytes is too large")
            header = json.loads(f.read(size))
        out = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            begin, end = (int(x) for x in meta["data_offsets"])
            shape = tuple(int(d) for d in meta["shape"])
            out[name] = TensorLayout(file, str(meta["dtype"]), shape, 8 + size + begin, end - begin)
        return out
    except (OSError, struct.error, ValueError, KeyError, TypeError) as exc:
        raise ShardError(f"{file}: not a readable safetensors file: {exc}") from exc


def read_tensors(
    path: str | Path,
    wanted: Mapping[str, tuple[int, ...]],
    convert: Callable[[torch.Tensor], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Read the tensors named in ``wanted`` (name -> expected shape), each passed through
    ``convert`` (dtype/device) right after it is read, so only one raw tensor is alive at once.

    Opens only the files that hold these names. For a GGUF file (names as
    :func:`checkpoint_names` gives them with ``gguf=True``) only these tensors are
    dequantized, see :func:`swarm.shards.gguf.read_gguf_tensors`.

    Raises:
        ShardError: a tensor is missing, has another shape, or a file cannot be read.
    """
    if is_gguf(path):
        return read_gguf_tensors(path, wanted, convert)
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


def read_quantized(
    path: str | Path,
    name: str,
    shape: tuple[int, ...],
    kind: Quantization,
    dtype: torch.dtype,
) -> QuantLinear:
    """The projection matrix ``name`` (checkpoint name, expected ``shape``) as an int8 or int4
    linear layer whose scales are in ``dtype`` (see :mod:`swarm.shards.quant`). GGUF Q4_0 and
    Q4_1 become int4 exactly, from their blocks; everything else is quantized from its float32
    values, one matrix alive at a time.

    Raises:
        ShardError: as :func:`read_tensors`.
    """
    if kind is Quantization.INT4 and is_gguf(path):
        exact = read_gguf_int4(path, name, shape, dtype)
        if exact is not None:
            return exact
    weight = read_tensors(path, {name: shape}, lambda t: t.to(torch.float32))[name]
    return quantize_linear(weight, None, kind, dtype)
