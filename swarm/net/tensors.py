"""Tensor codec: ``{dtype, shape, data}`` maps with raw little-endian bytes.

Only float32, float16, bfloat16 and int64 cross the wire. A decoder checks the dtype, the
shape (at most `MAX_NDIM` dimensions, each at most `MAX_DIM`) and that
``prod(shape) * itemsize == len(data)`` before any tensor is made, so a peer cannot make us
allocate more than it sent. The round trip is bit-exact (bfloat16 included: bytes are moved,
never converted).

Costs: encoding a contiguous CPU tensor makes no copy (the map holds a read-only view that
keeps the tensor alive until packed); decoding copies the bytes once into a writable buffer
(zero copies when given a writable buffer).
"""

from __future__ import annotations

import ctypes
import math
import sys
from typing import Any

import torch

from swarm.errors import ProtocolError
from swarm.types import FLOAT_DTYPES, torch_dtype

__all__ = ["DTYPES", "MAX_DIM", "MAX_NDIM", "decode_tensor", "encode_tensor", "tensor_view"]

DTYPES: dict[str, torch.dtype] = {name: torch_dtype(name) for name in (*FLOAT_DTYPES, "int64")}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_ITEMSIZE = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in DTYPES.items()}
MAX_NDIM = 8
MAX_DIM = 2**31 - 1
_KEYS = frozenset({"dtype", "shape", "data"})

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("swarm's tensor codec requires a little-endian host")


def tensor_view(tensor: torch.Tensor) -> memoryview:
    """A read-only byte view of a tensor's data (CPU, contiguous; copied there if needed).

    The view keeps the tensor alive. Raises `ValueError` for a dtype off the whitelist.
    """
    if tensor.dtype not in _NAMES:
        raise ValueError(f"dtype {tensor.dtype} cannot be sent; allowed: {', '.join(DTYPES)}")
    flat = tensor.detach().to("cpu").contiguous()
    nbytes = flat.numel() * flat.element_size()
    if nbytes == 0:
        return memoryview(b"")
    holder = (ctypes.c_char * nbytes).from_address(flat.data_ptr())
    holder.keepalive = flat  # type: ignore[attr-defined]  # the view must not outlive the data
    return memoryview(holder).cast("B").toreadonly()


def encode_tensor(tensor: torch.Tensor) -> dict[str, Any]:
    """The wire map of a tensor. Raises `ValueError` for a dtype off the whitelist."""
    data = tensor_view(tensor)
    return {"dtype": _NAMES[tensor.dtype], "shape": list(tensor.shape), "data": data}


def decode_tensor(obj: object, field: str = "tensor", max_bytes: int | None = None) -> torch.Tensor:
    """A tensor from its wire map.

    Raises `ProtocolError` naming ``field`` (e.g. ``"hidden_states.shape"``) for a map that is
    not exactly ``{dtype, shape, data}``, a dtype off the whitelist, a bad shape, a data
    length that does not match the shape, or more than ``max_bytes`` bytes.
    """
    if not isinstance(obj, dict):
        raise ProtocolError(f"{field}: expected a tensor map, got {type(obj).__name__}")
    if obj.keys() != _KEYS:
        extra = sorted(map(str, obj.keys() - _KEYS)) or sorted(_KEYS - obj.keys())
        raise ProtocolError(f"{field}: tensor map keys must be dtype, shape, data (bad: {extra})")
    name = obj["dtype"]
    dtype = DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise ProtocolError(f"{field}.dtype: {name!r} is not one of {', '.join(DTYPES)}")
    shape = _check_shape(obj["shape"], field)
    data = obj["data"]
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError(f"{field}.data: expected bytes, got {type(data).__name__}")
    expected = math.prod(shape) * _ITEMSIZE[name]
    if expected != len(data):
        raise ProtocolError(
            f"{field}.data: {len(data)} bytes, but shape {shape} of {obj['dtype']} needs {expected}"
        )
    if max_bytes is not None and expected > max_bytes:
        raise ProtocolError(f"{field}.data: {expected} bytes exceeds the limit of {max_bytes}")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    writable = data if isinstance(data, bytearray) else bytearray(data)
    return torch.frombuffer(writable, dtype=dtype).reshape(shape)


def _check_shape(shape: object, field: str) -> list[int]:
    if not isinstance(shape, list | tuple):
        raise ProtocolError(f"{field}.shape: expected a list, got {type(shape).__name__}")
    if len(shape) > MAX_NDIM:
        raise ProtocolError(f"{field}.shape: {len(shape)} dimensions; at most {MAX_NDIM}")
    for dim in shape:
        if not isinstance(dim, int) or isinstance(dim, bool) or not 0 <= dim <= MAX_DIM:
            raise ProtocolError(f"{field}.shape: {dim!r} is not a size in 0..{MAX_DIM}")
    return list(shape)
