"""Reading a GGUF checkpoint as it is: metadata, config, and only the tensors asked for.

A GGUF file (llama.cpp's format) holds the config, the tokenizer and the chat template as
metadata, and every tensor, often quantized, in one memory-mapped file. This module is the one
place that reads GGUF files:

- :func:`gguf_config_fields` translates the ``llama.*`` keys into the fields of a Hugging
  Face ``config.json`` (which :class:`~swarm.shards.config.ModelConfig` reads), refusing what
  our blocks do not compute (another architecture, a multi-part file, MoE, biases, RoPE
  variants other than plain and linear), and :func:`gguf_rope_factors` reads Llama 3.1's
  ``rope_freqs``;
- :func:`read_gguf_tensors` dequantizes only the named tensors (F32, F16, BF16, Q8_0, Q4_0,
  Q4_1, the K-quants and whatever else ``gguf.quants.dequantize`` supports) and undoes
  llama.cpp's reordering of the Q/K projection rows, so the weights equal the Hugging Face
  checkpoint's layout;
- :func:`gguf_metadata` and :func:`gguf_tensor_infos` hand the tokenizer, the chat template
  and the model id what they need.

Which of our parameters is which GGUF tensor is decided in :mod:`swarm.shards.checkpoint`.
Telling a GGUF file from a folder (:func:`~swarm.shards.gguf_header.is_gguf`) and parsing
the header belong to :mod:`swarm.shards.gguf_header`, which bounds every count in it
against the file's size before allocating (GGUF files are untrusted input); the parsed header
is cached per file (path, size and modification time) as plain Python values. Tensor data is
read through gguf's dequantization from the file's memory map.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from swarm.errors import ShardError
from swarm.shards.gguf_header import RawTensor, parse_header
from swarm.shards.quant import Int4Linear, int4_from_gguf_blocks

__all__ = [
    "GGUFTensorInfo",
    "gguf_config_fields",
    "gguf_metadata",
    "gguf_rope_factors",
    "gguf_tensor_infos",
    "read_gguf_int4",
    "read_gguf_tensors",
]

# Metadata arrays longer than this are handed out only when asked for by name (the
# vocabulary, merges and token types), so callers do not copy them for nothing.
_SMALL_ARRAY = 64


@dataclass(frozen=True)
class _Parsed:
    """What we keep of a file: every metadata value as plain Python (about 4 MB for a 49k
    vocabulary), the tensor entries, and the file's read-only memory map (nothing is read
    from it until a tensor is asked for)."""

    metadata: dict[str, Any]
    tensors: tuple[RawTensor, ...]
    data: np.ndarray[Any, np.dtype[np.uint8]]


@functools.lru_cache(maxsize=4)
def _cached_parse(path: str, size: int, mtime_ns: int) -> _Parsed:
    del size, mtime_ns  # part of the cache key only: a rewritten file is read again
    header = parse_header(path)  # bounded: see swarm.shards.gguf_header
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as exc:
        raise ShardError(f"{path}: cannot map the GGUF file: {exc}") from exc
    return _Parsed(header.metadata, header.tensors, data)


def _parsed(path: str | Path) -> _Parsed:
    """The (cached) parsed header of ``path``. Raises `ShardError` if unreadable."""
    file = Path(path).resolve()
    try:
        stat = file.stat()
    except OSError as exc:
        raise ShardError(f"{file}: cannot open the GGUF file: {exc}") from exc
    return _cached_parse(str(file), stat.st_size, stat.st_mtime_ns)


def gguf_metadata(path: str | Path, *, arrays: tuple[str, ...] = ()) -> dict[str, Any]:
    """The file's metadata as ``{key: value}``: scalars and strings, short arrays, and the long
    arrays named in ``arrays`` (e.g. ``"tokenizer.ggml.tokens"``); other long arrays are left
    out, so a caller that does not ask for the vocabulary does not copy it.

    Raises:
        ShardError: the file is not a readable GGUF file.
    """
    return {
        key: value
        for key, value in _parsed(path).metadata.items()
        if not isinstance(value, list) or len(value) <= _SMALL_ARRAY or key in arrays
    }


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor's entry in the file: ``shape`` in PyTorch order (rows first), the GGML
    type's name (``"Q4_1"``), its absolute byte ``offset`` in the file and ``nbytes``."""

    name: str
    type_name: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def gguf_tensor_infos(path: str | Path) -> dict[str, GGUFTensorInfo]:
    """Every tensor's :class:`GGUFTensorInfo`, from the header only (no tensor data read).

    Raises:
        ShardError: the file is not a readable GGUF file.
    """
    return {
        t.name: GGUFTensorInfo(t.name, t.type_name, t.shape, t.offset, t.nbytes)
        for t in _parsed(path).tensors
    }


def gguf_config_fields(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` fields (Hugging Face layout, for
    :meth:`~swarm.shards.config.ModelConfig.from_dict`) described by the ``llama.*`` metadata
    of a GGUF file. Llama 3.1 RoPE scaling is not among them: see :func:`gguf_rope_factors`.

    Raises:
        ShardError: the file is unreadable, split into several parts, of an architecture
            other than ``llama``, or uses something our blocks do not compute (mixture of
            experts, per-layer head counts, partial rotary, RoPE scaling other than linear,
            attention biases); the message names it.
    """
    meta = gguf_metadata(path)
    tensors = gguf_tensor_infos(path)
    _check_supported(Path(path), meta, tensors)
    hidden = _key_int(meta, "llama.embedding_length")
    heads = _key_int(meta, "llama.attention.head_count")
    kv_heads = _key_int(meta, "llama.attention.head_count_kv", heads)
    head_dim = _key_int(meta, "llama.attention.key_length", hidden // heads)
    for key in ("llama.attention.value_length", "llama.rope.dimension_count"):
        if _key_int(meta, key, head_dim) != head_dim:
            raise ShardError(f"{key}={meta[key]} differs from head_dim={head_dim}: unsupported")
    vocab = meta.get("llama.vocab_size")
    if vocab is None and "token_embd.weight" in tensors:
        vocab = tensors["token_embd.weight"].shape[0]
    eos = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    raw: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": _key_int(meta, "llama.feed_forward_length"),
        "num_hidden_layers": _key_int(meta, "llama.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "rms_norm_eps": float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_parameters": _rope_parameters(meta),
        "tie_word_embeddings": "output.weight" not in tensors,
        "max_position_embeddings": _key_int(meta, "llama.context_length", 2048),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": list(dict.fromkeys(int(i) for i in eos if i is not None)),
        "torch_dtype": _stored_dtype(tensors),
    }
    return raw


def gguf_rope_factors(path: str | Path) -> tuple[float, ...] | None:
    """Llama 3.1-style RoPE scaling as llama.cpp stores it, the ``rope_freqs.weight`` tensor:
    one factor per rotary frequency (unchecked: the config checks them against its
    ``head_dim``); None when the file has no such tensor.

    Raises:
        ShardError: the file is unreadable or the tensor's type cannot be dequantized.
    """
    tensor = next((t for t in _parsed(path).tensors if t.name == "rope_freqs.weight"), None)
    if tensor is None:
        return None
    return tuple(float(f) for f in dequantize_tensor(path, tensor).reshape(-1))


def _heads(path: str | Path) -> tuple[int, int]:
    """(query heads, key/value heads) of a GGUF file: the row groups of its Q and K
    projections, which llama.cpp reorders per head."""
    meta = gguf_metadata(path)
    heads = _key_int(meta, "llama.attention.head_count")
    return heads, _key_int(meta, "llama.attention.head_count_kv", heads)


def _check_supported(
    file: Path, meta: Mapping[str, Any], tensors: Mapping[str, GGUFTensorInfo]
) -> None:
    parts = int(meta.get("split.count", 1) or 1)
    if parts > 1:
        raise ShardError(
            f"{file.name}: a multi-part GGUF (split.count={parts}) is not supported; merge the "
            "parts into one file first (llama.cpp: llama-gguf-split --merge)"
        )
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ShardError(f"{file.name}: GGUF architecture {arch!r} is not supported (only 'llama')")
    if int(meta.get("llama.expert_count", 0) or 0) > 0:
        raise ShardError(
            f"{file.name}: mixture-of-experts GGUF (llama.expert_count) is not supported"
        )
    for key in (
        "llama.attention.head_count",
        "llama.attention.head_count_kv",
        "llama.feed_forward_length",
    ):
        if isinstance(meta.get(key), list):
            raise ShardError(f"{file.name}: per-layer {key} is not supported")
    biased = sorted(n for n in tensors if n.startswith("blk.") and n.endswith(".bias"))
    if biased:
        raise ShardError(
            f"{file.name}: bias tensors ({biased[0]}, ...) are not supported for GGUF llama models"
        )


def _rope_parameters(meta: Mapping[str, Any]) -> dict[str, Any]:
    theta = float(meta.get("llama.rope.freq_base", 10000.0))
    kind = meta.get("llama.rope.scaling.type", "none")
    factor = float(meta.get("llama.rope.scaling.factor", 1.0) or 1.0)
    if kind in ("none", "") or (kind == "linear" and factor == 1.0):
        return {"rope_type": "default", "rope_theta": theta}
    if kind == "linear":
        return {"rope_type": "linear", "rope_theta": theta, "factor": factor}
    raise ShardError(f"llama.rope.scaling.type={kind!r} is not supported (none or linear)")


def _stored_dtype(tensors: Mapping[str, GGUFTensorInfo]) -> str:
    """The float type of the layer matrices when unquantized, else float32 (dequantized)."""
    types = {t.type_name for t in tensors.values() if len(t.shape) == 2}
    if types == {"F16"}:
        return "float16"
    if types == {"BF16"}:
        return "bfloat16"
    return "float32"


def _key_int(meta: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = meta.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ShardError(f"GGUF metadata {key}={value!r}: expected a positive integer")
    return value


def read_gguf_tensors(
    path: str | Path,
    wanted: Mapping[str, tuple[int, ...]],
    convert: Callable[[torch.Tensor], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Dequantize the tensors named in ``wanted`` (GGUF name -> expected PyTorch shape),
    each passed through ``convert`` (dtype/device) right away, so only one float32 copy of
    one tensor is alive at a time. Q/K projections come back in Hugging Face row order.

    Only these tensors' bytes are touched (the file is memory-mapped).

    Raises:
        ShardError: a tensor is missing, has another shape, or has a type that cannot be
            dequantized.
    """
    by_name = {t.name: t for t in _parsed(path).tensors}
    heads, kv_heads = _heads(path)
    out: dict[str, torch.Tensor] = {}
    for name, shape in wanted.items():
        tensor = by_name.get(name)
        if tensor is None:
            raise ShardError(f"{Path(path).name}: GGUF has no tensor {name!r}")
        stored = tensor.shape
        if stored != tuple(shape):
            raise ShardError(
                f"{Path(path).name}: tensor {name!r} has shape {list(stored)}, "
                f"expected {list(shape)}"
            )
        values = torch.from_numpy(dequantize_tensor(path, tensor)).reshape(stored)  # (rows, cols)
        if name.endswith(".attn_q.weight"):
            values = unpermute_rows(values, heads)
        elif name.endswith(".attn_k.weight"):
            values = unpermute_rows(values, kv_heads)
        out[name] = convert(values)
        del values
    return out


def tensor_bytes(path: str | Path, tensor: RawTensor) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """A read-only view of ``tensor``'s bytes in the file's memory map, shaped (rows, bytes
    per row) in PyTorch order (rows = every dimension but the innermost)."""
    raw = _parsed(path).data[tensor.offset : tensor.offset + tensor.nbytes]
    rows = 1
    for d in tensor.shape[:-1]:
        rows *= d
    return raw.reshape(rows, -1) if rows else raw.reshape(0, 0)


def dequantize_tensor(path: str | Path, tensor: RawTensor) -> np.ndarray[Any, np.dtype[np.float32]]:
    """One tensor's values as float32, (rows, cols) (a fresh array, not a view of the file).

    Raises:
        ShardError: the GGML type cannot be dequantized by the installed ``gguf`` package.
    """
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    try:
        values = dequantize(tensor_bytes(path, tensor), GGMLQuantizationType(tensor.type_id))
    except NotImplementedError as exc:
        raise ShardError(
            f"tensor {tensor.name!r} is {tensor.type_name}, which the installed gguf "
            f"package cannot dequantize: {exc}"
        ) from exc
    if values.dtype == np.float32 and values.flags.owndata and values.flags.writeable:
        return values  # already a fresh array (block types, F16)
    return np.array(values, dtype=np.float32)  # F32 comes as a read-only view of the map


def read_gguf_int4(
    path: str | Path,
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
) -> Int4Linear | None:
    """The Q4_0/Q4_1 tensor ``name`` as an int4 layer, exactly (see
    :func:`swarm.shards.quant.int4_from_gguf_blocks`), in Hugging Face row order; None when
    it is stored in another type (or a Q4_1 block's zero is not exact in float32).

    Raises:
        ShardError: the tensor is missing or has another shape.
    """
    tensor = next((t for t in _parsed(path).tensors if t.name == name), None)
    if tensor is None:
        raise ShardError(f"{Path(path).name}: GGUF has no tensor {name!r}")
    if tensor.shape != tuple(shape):
        raise ShardError(f"{Path(path).name}: tensor {name!r} has shape {list(tensor.shape)}, "
                         f"expected {list(shape)}")  # fmt: skip
    if tensor.type_name not in ("Q4_0", "Q4_1"):
        return None
    try:
        q, scales, zeros = int4_from_gguf_blocks(tensor_bytes(path, tensor), tensor.type_name)
    except ShardError:
        return None
    heads, kv_heads = _heads(path)
    for suffix, count in (("attn_q.weight", heads), ("attn_k.weight", kv_heads)):
        if name.endswith(suffix):
            q, scales, zeros = (unpermute_rows(t, count) for t in (q, scales, zeros))
    linear = Int4Linear.pack(q, scales, zeros, None, dtype)
    linear.exact = True
    return linear


def unpermute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's RoPE row order for a Q or K projection (heads*head_dim, in_features).

    llama.cpp's converter interleaves each head's two rotary halves (rows ``[a0, a1, ...,
    b0, b1, ...]`` become ``[a0, b0, a1, b1, ...]``) because GGML rotates adjacent pairs;
    our blocks, like Hugging Face's, rotate halves.
    """
    rows = weight.shape[0]
    half = rows // heads // 2
    w = weight.reshape(heads, half, 2, *weight.shape[1:])  # (heads, half, 2, in)
    return w.transpose(1, 2).reshape(weight.shape).contiguous()  # (heads*head_dim, in)
