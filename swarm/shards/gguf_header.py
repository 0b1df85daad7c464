"""The GGUF header, parsed with every count bounded before anything is allocated.

A GGUF file is untrusted input: its header is a list of counts (keys, array elements, string
lengths, tensor entries, dimensions) that a hostile file can set to anything. ``gguf``'s own
``GGUFReader`` trusts them (a 49-byte file claiming an array of 2**62 strings grew it to
1.5 GiB; 2.4 MB of empty strings took 710 MiB; nested arrays raised ``RecursionError``).
This parser checks each count against the bytes left in the file, and against fixed caps
far above any real model's, before it allocates; every failure is a `ShardError` naming the
problem. Memory is then bounded by a small multiple of the header's size, and time by its
length (SmolLM2's header with its 49k-token vocabulary: 0.15-0.35 s, where ``GGUFReader``
and reading its values took 8.4 s, on the loaded shared dev machine).

Format (version 2 and 3, little-endian): magic ``GGUF``, version u32, tensor count u64,
key-value count u64, the key-value pairs, the tensor entries (name, dimension count u32,
dimensions u64 each, innermost first, GGML type u32, data offset u64), then the tensor data
at the next multiple of ``general.alignment`` (32 by default).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from swarm.errors import ShardError

__all__ = ["GGUFHeader", "RawTensor", "is_gguf", "parse_header"]

MAX_KEYS = 1 << 16
MAX_TENSORS = 1 << 16
MAX_ARRAY = 1 << 24  # elements in one metadata array (the largest vocabularies hold ~2**18)
MAX_DEPTH = 3  # arrays of arrays of scalars; llama.cpp writes none deeper
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32
_MAGIC = b"GGUF"

_STRING, _ARRAY = 8, 9
# GGUF value type -> (struct format, numpy dtype) of the fixed-size scalar types.
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("<B", "<u1"),
    1: ("<b", "<i1"),
    2: ("<H", "<u2"),
    3: ("<h", "<i2"),
    4: ("<I", "<u4"),
    5: ("<i", "<i4"),
    6: ("<f", "<f4"),
    7: ("<?", "<?"),
    10: ("<Q", "<u8"),
    11: ("<q", "<i8"),
    12: ("<d", "<f8"),
}


@dataclass(frozen=True)
class RawTensor:
    """One tensor entry, checked to lie inside the file: its ``name``, GGML type (its number
    ``type_id`` and name ``type_name``), ``shape`` in PyTorch order (rows first), absolute
    byte ``offset`` in the file and ``nbytes``."""

    name: str
    type_id: int
    type_name: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    """A parsed header: ``metadata`` as plain Python values (arrays as lists) and the tensor
    entries in file order."""

    metadata: dict[str, Any]
    tensors: tuple[RawTensor, ...]


def is_gguf(path: str | Path) -> bool:
    """True when ``path`` is a file ending in ``.gguf`` or starting with the GGUF magic (a
    Hugging Face checkpoint is a folder)."""
    file = Path(path)
    if not file.is_file():
        return False
    if file.suffix.lower() == ".gguf":
        return True
    try:
        with file.open("rb") as f:
            return f.read(4) == _MAGIC
    except OSError:
        return False


def parse_header(path: str | Path) -> GGUFHeader:
    """Parse the header of the GGUF file at ``path``, reading only the header's bytes.

    Raises:
        ShardError: the file cannot be opened, is not GGUF version 2 or 3, or any count, size,
            type or nesting in it is out of bounds; the message names the field.
    """
    file = Path(path)
    try:
        with file.open("rb") as f:
            if file.stat().st_size == 0:
                raise ShardError(f"{file}: an empty file is not GGUF")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                return _Parser(file.name, mapped).header()
    except (OSError, ValueError) as exc:
        raise ShardError(f"{file}: cannot open the GGUF file: {exc}") from exc


class _Parser:
    """A cursor over the file's bytes; each read checks that the bytes are there."""

    def __init__(self, name: str, data: mmap.mmap) -> None:
        self.name = name
        self.data = data
        self.pos = 0

    def fail(self, problem: str) -> ShardError:
        return ShardError(f"{self.name}: malformed GGUF header: {problem}")

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, count: int, what: str) -> bytes:
        if count > self.left:
            raise self.fail(f"{what} needs {count} bytes at offset {self.pos}; the file ends "
                            f"{self.left} bytes later")  # fmt: skip
        chunk = self.data[self.pos : self.pos + count]
        self.pos += count
        return chunk

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        length = self.scalar("<Q", what)
        if length > self.left:
            raise self.fail(f"{what}: a string of {length} bytes, but {self.left} bytes remain")
        try:
            return self.take(length, what).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what}: not valid UTF-8 ({exc.reason})") from exc

    def header(self) -> GGUFHeader:
        if self.take(4, "the magic") != _MAGIC:
            raise self.fail("the magic is not 'GGUF'")
        version = self.scalar("<I", "the version")
        if version not in (2, 3):
            raise self.fail(f"version {version} is not supported (2 or 3)")
        tensor_count = self.scalar("<Q", "the tensor count")
        key_count = self.scalar("<Q", "the metadata count")
        # A key-value pair takes at least 12 bytes (key length, value type), a tensor entry 24.
        self.bounded(key_count, 12 * key_count, MAX_KEYS, "metadata key-value pairs")
        self.bounded(tensor_count, 24 * tensor_count, MAX_TENSORS, "tensors")
        metadata: dict[str, Any] = {}
        for _ in range(key_count):
            key = self.string("a metadata key")
            metadata[key] = self.value(key, self.scalar("<I", f"the type of {key!r}"), 0)
        entries = [self.tensor_entry() for _ in range(tensor_count)]
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise self.fail(f"general.alignment={alignment!r} is not a power of two")
        start = -(-self.pos // alignment) * alignment
        return GGUFHeader(metadata, tuple(self.located(e, start) for e in entries))

    def bounded(self, count: int, needs: int, cap: int, what: str) -> None:
        if count > cap or needs > self.left:
            raise self.fail(f"claims {count} {what}; {self.left} bytes remain and at most "
                            f"{cap} are accepted")  # fmt: skip

    def value(self, key: str, kind: int, depth: int) -> Any:
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind][0], f"the value of {key!r}")
        if kind == _STRING:
            return self.string(f"the value of {key!r}")
        if kind != _ARRAY:
            raise self.fail(f"{key!r} has value type {kind}, which GGUF does not define")
        if depth >= MAX_DEPTH:
            raise self.fail(f"{key!r} has arrays nested deeper than {MAX_DEPTH}")
        item = self.scalar("<I", f"the element type of {key!r}")
        count = self.scalar("<Q", f"the length of {key!r}")
        smallest = struct.calcsize(_SCALARS[item][0]) if item in _SCALARS else 8  # string: 8
        if item == _ARRAY:
            smallest = 12
        if count > MAX_ARRAY or count * smallest > self.left:
            raise self.fail(f"array {key!r} claims {count} elements; {self.left} bytes remain "
                            f"and at most {MAX_ARRAY} are accepted")  # fmt: skip
        if item in _SCALARS:
            dtype = np.dtype(_SCALARS[item][1])
            raw = self.take(count * dtype.itemsize, f"the array {key!r}")
            return np.frombuffer(raw, dtype=dtype, count=count).tolist()
        if item == _STRING:
            return self.strings(key, count)
        return [self.value(key, item, depth + 1) for _ in range(count)]

    def strings(self, key: str, count: int) -> list[str]:
        """An array of ``count`` strings (the vocabulary: one tight loop, ~0.5 us a string)."""
        data, pos, end = self.data, self.pos, len(self.data)
        unpack = struct.Struct("<Q").unpack_from
        out: list[str] = []
        append = out.append
        try:
            for _ in range(count):
                if pos + 8 > end:
                    raise self.fail(f"array {key!r} ends past the end of the file")
                (length,) = unpack(data, pos)
                pos += 8
                if length > end - pos:
                    raise self.fail(f"array {key!r}: a string of {length} bytes, but "
                                    f"{end - pos} bytes remain")  # fmt: skip
                if length:
                    append(data[pos : pos + length].decode("utf-8"))
                    pos += length
                else:
                    append("")
        except UnicodeDecodeError as exc:
            raise self.fail(f"array {key!r}: not valid UTF-8 ({exc.reason})") from exc
        self.pos = pos
        return out

    def tensor_entry(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self.string("a tensor name")
        dims = self.scalar("<I", f"the dimension count of {name!r}")
        if dims == 0 or dims > MAX_DIMS:
            raise self.fail(f"tensor {name!r} has {dims} dimensions (1 to {MAX_DIMS})")
        shape = struct.unpack(f"<{dims}Q", self.take(8 * dims, f"the shape of {name!r}"))
        kind = self.scalar("<I", f"the type of {name!r}")
        offset = self.scalar("<Q", f"the data offset of {name!r}")
        return name, tuple(shape), kind, offset

    def located(self, entry: tuple[str, tuple[int, ...], int, int], start: int) -> RawTensor:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        name, dims, kind, offset = entry
        try:
            qtype = GGMLQuantizationType(kind)
            block, block_bytes = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise self.fail(f"tensor {name!r} has GGML type {kind}, which is unknown") from None
        if dims[0] % block:
            raise self.fail(f"tensor {name!r}: rows of {dims[0]} values are not whole "
                            f"{qtype.name} blocks of {block}")  # fmt: skip
        rows = 1
        for d in dims[1:]:
            rows *= d
        nbytes = rows * (dims[0] // block) * block_bytes
        begin = start + offset
        if begin + nbytes > len(self.data):
            raise self.fail(f"tensor {name!r} ({nbytes} bytes at offset {begin}) lies past the "
                            f"end of the {len(self.data)}-byte file")  # fmt: skip
        return RawTensor(name, kind, qtype.name, tuple(reversed(dims)), begin, nbytes)
