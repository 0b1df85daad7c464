"""Hostile GGUF headers: every count, size and nesting depth is checked against the file's own
size before anything is allocated, and every refusal is a `ShardError` naming the problem.

Each case is refused with work and memory bounded by the file's size, whatever its counts
claim: the calls made while parsing (counted with :func:`sys.setprofile`, Python and C calls
alike) and the peak of Python allocations (traced with :mod:`tracemalloc`, which numpy reports
to) stay within a small multiple of its bytes. Before the header had its own bounded parser,
``gguf.GGUFReader`` grew to 1.5 GiB on the 49-byte file, took 710 MiB and 10 s on the empty
strings, and raised a bare ``RecursionError`` on the nesting. How long a refusal takes is a
benchmark's business (``benchmarks/gguf_bombs.py``), not a test's.
"""

from __future__ import annotations

import re
import struct
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import gguf  # noqa: F401  (imported lazily by the parser: a one-time cost, not the file's)
import pytest

import swarm.shards.gguf as gguf_module
from swarm.errors import ShardError
from swarm.shards import ModelConfig
from swarm.shards.gguf import gguf_metadata, gguf_tensor_infos

UINT32, STRING, ARRAY, UINT64 = 4, 8, 9, 10
# Work and memory allowed: a fixed part (opening the file, building the error) and a part
# proportional to the file (a tight loop per string element: a few calls per 8 bytes).
BASE_CALLS, CALLS_PER_BYTE = 10_000, 1
BASE_BYTES, BYTES_PER_BYTE = 1024 * 1024, 4


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _header(tensors: int, kvs: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, tensors, kvs)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _calls_made(read: Callable[[], object], match: str) -> int:
    """The function calls (Python and C) made while ``read`` is refused."""
    calls = 0

    def count(frame: object, event: str, arg: object) -> None:
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    refusal: ShardError | None = None
    sys.setprofile(count)
    try:
        read()
    except ShardError as exc:
        refusal = exc
    finally:
        sys.setprofile(None)
    assert refusal is not None and re.search(match, str(refusal)), refusal
    return calls


def _refused_fast(path: Path, read: Callable[[], object], match: str) -> None:
    """Refused with work and memory bounded by the size of the file at ``path``, counted on
    an empty parse cache each time (tracing and profiling are done apart: each slows the
    other's subject)."""
    size = path.stat().st_size
    gguf_module._cached_parse.cache_clear()
    calls = _calls_made(read, match)
    gguf_module._cached_parse.cache_clear()
    tracemalloc.start()
    try:
        with pytest.raises(ShardError, match=match):
            read()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert calls <= BASE_CALLS + CALLS_PER_BYTE * size, f"{calls} calls for {size} bytes"
    assert peak <= BASE_BYTES + BYTES_PER_BYTE * size, f"allocated {peak / 2**20:.1f} MiB"


def test_array_claiming_2_62_elements(tmp_path: Path) -> None:
    data = _header(0, 1) + _string("a") + struct.pack("<IIQ", ARRAY, STRING, 2**62)
    path = _write(tmp_path / "bomb.gguf", data)
    assert path.stat().st_size == 49
    _refused_fast(path, lambda: gguf_metadata(path), r"'a'.*2\^?\d+|'a'.*claims \d+ elements")


def test_numeric_array_past_the_end(tmp_path: Path) -> None:
    data = _header(0, 1) + _string("n") + struct.pack("<IIQ", ARRAY, UINT64, 10**6) + b"\0" * 64
    path = _write(tmp_path / "short.gguf", data)
    _refused_fast(path, lambda: gguf_metadata(path), r"'n'.*claims 1000000 elements")


def test_megabytes_of_empty_strings(tmp_path: Path) -> None:
    count = 300_000  # 2.4 MB of zero lengths
    data = (
        _header(0, 1)
        + _string("general.architecture")
        + struct.pack("<IIQ", ARRAY, STRING, count)
        + b"\0" * (8 * count)
    )
    path = _write(tmp_path / "strings.gguf", data)
    # Read within bounds (a list of empty strings), then refused as a model: no architecture.
    _refused_fast(path, lambda: ModelConfig.from_pretrained(path), r"architecture")


def test_string_longer_than_the_file(tmp_path: Path) -> None:
    data = _header(0, 1) + struct.pack("<Q", 2**60) + b"key" + b"\0" * 16
    path = _write(tmp_path / "longkey.gguf", data)
    _refused_fast(path, lambda: gguf_metadata(path), r"string of 2\^?\d+|string of \d+ bytes")


def test_deep_nesting(tmp_path: Path) -> None:
    depth = 5_000  # 60 KB of nested one-element arrays
    data = (
        _header(0, 1)
        + _string("nest")
        + struct.pack("<I", ARRAY)
        + struct.pack("<IQ", ARRAY, 1) * depth
        + struct.pack("<IQ", UINT32, 1)
        + b"\0" * 4
    )
    path = _write(tmp_path / "nest.gguf", data)
    _refused_fast(path, lambda: gguf_metadata(path), r"'nest'.*nested")


def test_huge_tensor_count(tmp_path: Path) -> None:
    path = _write(tmp_path / "tensors.gguf", _header(2**40, 0) + b"\0" * 1024)
    _refused_fast(path, lambda: gguf_tensor_infos(path), r"claims 1099511627776 tensors")


def test_many_real_tensor_entries(tmp_path: Path) -> None:
    count = 200_000  # 4.8 MB of minimal, well-formed tensor entries
    entry = _string("") + struct.pack("<I", 1) + struct.pack("<Q", 0) + struct.pack("<IQ", 0, 0)
    path = _write(tmp_path / "entries.gguf", _header(count, 0) + entry * count)
    _refused_fast(path, lambda: gguf_tensor_infos(path), r"200000 tensors")


def test_many_keys(tmp_path: Path) -> None:
    path = _write(tmp_path / "keys.gguf", _header(0, 2**50) + b"\0" * 64)
    _refused_fast(path, lambda: gguf_metadata(path), r"claims 1125899906842624 metadata")


def _refused_file(path: Path, data: bytes, read: Callable[[Path], object], match: str) -> None:
    _write(path, data)
    _refused_fast(path, lambda: read(path), match)


def test_tensor_dimensions_and_data_past_the_end(tmp_path: Path) -> None:
    many_dims = _header(1, 0) + _string("t") + struct.pack("<I", 2**31) + b"\0" * 64
    _refused_file(tmp_path / "dims.gguf", many_dims, gguf_tensor_infos, r"'t'.*dimensions")
    # A 2**40 x 2**40 F32 tensor at offset 0 of a tiny file.
    huge = _header(1, 0) + _string("t") + struct.pack("<IQQIQ", 2, 2**40, 2**40, 0, 0)
    _refused_file(tmp_path / "huge.gguf", huge, gguf_tensor_infos, r"'t'.*past the end")
    unknown = _header(1, 0) + _string("t") + struct.pack("<IQIQ", 1, 32, 999, 0)
    _refused_file(tmp_path / "type.gguf", unknown, gguf_tensor_infos, r"'t'.*type 999")


def test_bad_magic_version_and_value_type(tmp_path: Path) -> None:
    _refused_file(tmp_path / "magic.gguf", b"GGUX" + b"\0" * 20, gguf_metadata, r"magic")
    old = b"GGUF" + struct.pack("<IQQ", 1, 0, 0)
    _refused_file(tmp_path / "v1.gguf", old, gguf_metadata, r"version 1")
    bad = _header(0, 1) + _string("k") + struct.pack("<I", 77)
    _refused_file(tmp_path / "vt.gguf", bad, gguf_metadata, r"'k'.*type 77")
    utf = _header(0, 1) + struct.pack("<Q", 2) + b"\xff\xfe" + struct.pack("<I", UINT32) + b"\0" * 4
    _refused_file(tmp_path / "utf.gguf", utf, gguf_metadata, r"UTF-8")
