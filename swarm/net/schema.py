"""The message schema machinery: frozen dataclasses with strict, annotation-built decoders.

A message is a frozen dataclass decorated with ``@message("tag")``. On the wire it is a
msgpack map ``{"t": tag, "v": PROTOCOL_VERSION, <field>: <value>, ...}``. The decoder is
built from the annotations, so adding a type is a few declarative lines::

    @message("info_request")
    class InfoRequest(Message):
        verbose: bool = False
        limit: int = bounded(ge=0, le=100, default=10)

Field types understood: ``int``, ``float`` (finite only), ``bool``, ``str``, ``bytes``,
``torch.Tensor`` (the tensor codec), ``LayerRange``, ``PeerId``, ``Literal[...]`` of strings,
a ``StrEnum``, another `Message` (nested map), ``tuple[T, ...]`` and ``T | None``. `bounded`
adds value ranges and length limits. Decoding raises only `ProtocolError`, naming the bad
field: unknown or missing fields, wrong types, values out of range, an unknown tag or another
protocol version.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar, Literal, TypeVar, dataclass_transform

import msgpack
import torch

from swarm.errors import ProtocolError
from swarm.net.tensors import decode_tensor, encode_tensor
from swarm.types import LayerRange, PeerId

__all__ = [
    "PROTOCOL_VERSION",
    "Message",
    "bounded",
    "decode_message",
    "encode_message",
    "message",
    "message_from_wire",
    "unpack",
]

PROTOCOL_VERSION = 3  # 2: error codes, enum states, finite floats, push senders; 3: a
# step's input, a new push target and a new pusher are three messages
_INT64 = (-(2**63), 2**63 - 1)
_DEFAULT_MAX_LEN = 1 << 16  # str / bytes / tuple items unless a field says otherwise

Decoder = Callable[[object, str], Any]
Encoder = Callable[[Any], Any]
M = TypeVar("M", bound="Message")


def bounded(
    *,
    ge: float | None = None,
    le: float | None = None,
    max_len: int | None = None,
    default: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with a value range (numbers) or a length limit (str, bytes, tuple)."""
    meta = {"ge": ge, "le": le, "max_len": max_len}
    return dataclasses.field(default=default, metadata=meta)


class Message:
    """Base of every wire message; subclasses are made with `message`."""

    TAG: ClassVar[str]
    _FIELDS: ClassVar[tuple[tuple[str, Decoder, Encoder, bool], ...]]
    _KNOWN: ClassVar[frozenset[str]]

    def to_wire(self) -> dict[str, Any]:
        """The msgpack-ready map of this message (tensors as zero-copy views)."""
        out: dict[str, Any] = {"t": self.TAG, "v": PROTOCOL_VERSION}
        for name, _decode, encode, _required in self._FIELDS:
            out[name] = encode(getattr(self, name))
        return out


_REGISTRY: dict[str, type[Message]] = {}


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field, bounded))
def message(tag: str) -> Callable[[type[M]], type[M]]:
    """Class decorator: make a frozen dataclass and register it under ``tag``."""

    def wrap(cls: type[M]) -> type[M]:
        if tag in _REGISTRY:
            raise ValueError(f"message tag {tag!r} is already used by {_REGISTRY[tag].__name__}")
        data_cls = dataclasses.dataclass(frozen=True)(cls)
        hints = typing.get_type_hints(data_cls)
        specs = []
        for f in dataclasses.fields(typing.cast(Any, data_cls)):
            decode, encode = _codec(hints[f.name], dict(f.metadata))
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            specs.append((f.name, decode, encode, required))
        data_cls.TAG = tag
        data_cls._FIELDS = tuple(specs)
        data_cls._KNOWN = frozenset([*(name for name, *_ in specs), "t", "v"])
        _REGISTRY[tag] = data_cls
        return data_cls

    return wrap


def message_from_wire(obj: object, field: str = "message", expect: type[M] | None = None) -> Any:
    """The message a decoded msgpack map describes. Raises `ProtocolError`."""
    if not isinstance(obj, dict):
        raise ProtocolError(f"{field}: expected a map, got {type(obj).__name__}")
    tag = obj.get("t")
    cls = _REGISTRY.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise ProtocolError(f"{field}.t: unknown message type {tag!r}")
    if expect is not None and cls is not expect:
        raise ProtocolError(f"{field}.t: expected {expect.TAG!r}, got {tag!r}")
    if obj.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(
            f"{field}.v: protocol version {obj.get('v')!r}, we speak {PROTOCOL_VERSION}"
        )
    known = cls._KNOWN
    for key in obj:
        if key not in known:
            raise ProtocolError(f"{field}.{key!s:.40}: unknown field for {tag!r}")
    kwargs = {}
    for name, decode, _encode, required in cls._FIELDS:
        if name in obj:
            kwargs[name] = decode(obj[name], f"{field}.{name}")
        elif required:
            raise ProtocolError(f"{field}.{name}: missing")
    return cls(**kwargs)


def encode_message(msg: Message) -> bytes:
    """msgpack bytes of a message (one copy of any tensor data)."""
    return msgpack.packb(msg.to_wire(), use_bin_type=True)  # type: ignore[no-any-return]


def decode_message(data: bytes | bytearray | memoryview, expect: type[M] | None = None) -> Any:
    """Parse msgpack bytes into a message. Raises only `ProtocolError`."""
    return message_from_wire(unpack(data), expect=expect)


def unpack(data: bytes | bytearray | memoryview) -> object:
    """Strict msgpack parsing (str keys, no ext types). Raises only `ProtocolError`."""
    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True, ext_hook=_no_ext
        )
    except Exception as exc:  # msgpack raises many types for malformed input
        raise ProtocolError(f"malformed msgpack: {type(exc).__name__}: {exc}"[:200]) from exc


def _no_ext(code: int, data: bytes) -> object:
    raise ValueError(f"msgpack extension type {code} is not allowed")


# ---- field codecs, built once per field from its annotation ----


def _codec(tp: Any, meta: dict[str, Any]) -> tuple[Decoder, Encoder]:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"only `T | None` unions are supported, not {tp}")
        inner_dec, inner_enc = _codec(args[0], meta)
        return (
            lambda v, path: None if v is None else inner_dec(v, path),
            lambda v: None if v is None else inner_enc(v),
        )
    if origin is tuple:
        return _tuple_codec(tp, meta)
    if origin is Literal:
        return _literal_codec(typing.get_args(tp))
    if isinstance(tp, type) and issubclass(tp, enum.StrEnum):
        return _enum_codec(tp)
    if isinstance(tp, type) and issubclass(tp, Message):
        return (lambda v, path: message_from_wire(v, path, expect=tp)), (lambda v: v.to_wire())
    simple = _SIMPLE.get(tp)
    if simple is None:
        raise TypeError(f"no wire codec for field type {tp}")
    return simple(meta)


def _tuple_codec(tp: Any, meta: dict[str, Any]) -> tuple[Decoder, Encoder]:
    args = typing.get_args(tp)
    if len(args) != 2 or args[1] is not Ellipsis:
        raise TypeError(f"only tuple[T, ...] is supported, not {tp}")
    item_dec, item_enc = _codec(args[0], {})
    max_len = meta.get("max_len") or _DEFAULT_MAX_LEN

    def decode(v: object, path: str) -> tuple[Any, ...]:
        if not isinstance(v, list):
            raise ProtocolError(f"{path}: expected a list, got {type(v).__name__}")
        if len(v) > max_len:
            raise ProtocolError(f"{path}: {len(v)} items; at most {max_len}")
        return tuple(item_dec(item, f"{path}[{i}]") for i, item in enumerate(v))

    return decode, lambda v: [item_enc(item) for item in v]


def _literal_codec(choices: tuple[Any, ...]) -> tuple[Decoder, Encoder]:
    def decode(v: object, path: str) -> Any:
        if not isinstance(v, str) or v not in choices:
            raise ProtocolError(f"{path}: {v!r:.40} is not one of {', '.join(choices)}")
        return v

    return decode, _identity


def _enum_codec(kind: type[enum.StrEnum]) -> tuple[Decoder, Encoder]:
    values = {member.value: member for member in kind}

    def decode(v: object, path: str) -> Any:
        member = values.get(v) if isinstance(v, str) else None
        if member is None:
            raise ProtocolError(f"{path}: {v!r:.40} is not one of {', '.join(values)}")
        return member

    return decode, str


def _identity(v: Any) -> Any:
    return v


def _number_codec(kind: type, meta: dict[str, Any]) -> tuple[Decoder, Encoder]:
    lo = meta.get("ge")
    hi = meta.get("le")
    if kind is int:
        lo = _INT64[0] if lo is None else lo
        hi = _INT64[1] if hi is None else hi

    def decode(v: object, path: str) -> Any:
        ok_types: tuple[type, ...] = (int,) if kind is int else (int, float)
        if not isinstance(v, ok_types) or isinstance(v, bool):
            raise ProtocolError(f"{path}: expected {kind.__name__}, got {type(v).__name__}")
        value = kind(v)
        if kind is float and not math.isfinite(value):
            raise ProtocolError(f"{path}: {value!r} is not a finite number")
        if (lo is not None and not value >= lo) or (hi is not None and not value <= hi):
            raise ProtocolError(f"{path}: {value!r} out of range [{lo}, {hi}]")
        return value

    return decode, _identity


def _sized_codec(kind: type, meta: dict[str, Any]) -> tuple[Decoder, Encoder]:
    max_len = meta.get("max_len") or _DEFAULT_MAX_LEN

    def decode(v: object, path: str) -> Any:
        if not isinstance(v, kind):
            raise ProtocolError(f"{path}: expected {kind.__name__}, got {type(v).__name__}")
        if len(v) > max_len:  # type: ignore[arg-type]
            raise ProtocolError(f"{path}: length {len(v)} exceeds {max_len}")  # type: ignore[arg-type]
        return v

    return decode, _identity


def _bool_codec(meta: dict[str, Any]) -> tuple[Decoder, Encoder]:
    def decode(v: object, path: str) -> bool:
        if not isinstance(v, bool):
            raise ProtocolError(f"{path}: expected bool, got {type(v).__name__}")
        return v

    return decode, _identity


def _tensor_codec(meta: dict[str, Any]) -> tuple[Decoder, Encoder]:
    return (lambda v, path: decode_tensor(v, path)), encode_tensor


def _layer_range_codec(meta: dict[str, Any]) -> tuple[Decoder, Encoder]:
    def decode(v: object, path: str) -> LayerRange:
        if (
            not isinstance(v, list)
            or len(v) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in v)
            or not 0 <= v[0] < v[1] <= 1_000_000
        ):
            raise ProtocolError(f"{path}: expected [start, stop] with 0 <= start < stop")
        return LayerRange(v[0], v[1])

    return decode, lambda r: [r.start, r.stop]


def _peer_id_codec(meta: dict[str, Any]) -> tuple[Decoder, Encoder]:
    def decode(v: object, path: str) -> PeerId:
        if not isinstance(v, bytes) or len(v) != 32:
            raise ProtocolError(f"{path}: expected a 32-byte peer id")
        return PeerId(v)

    return decode, lambda p: p.digest


_SIMPLE: dict[Any, Callable[[dict[str, Any]], tuple[Decoder, Encoder]]] = {
    int: lambda meta: _number_codec(int, meta),
    float: lambda meta: _number_codec(float, meta),
    bool: _bool_codec,
    str: lambda meta: _sized_codec(str, meta),
    bytes: lambda meta: _sized_codec(bytes, meta),
    torch.Tensor: _tensor_codec,
    LayerRange: _layer_range_codec,
    PeerId: _peer_id_codec,
}
