"""How long hostile GGUF headers take to be refused (the time half of
tests/shards/test_gguf_bombs.py, which checks work and memory bounded by the file's size).

    python benchmarks/gguf_bombs.py            # 5 runs of each file, best and median

Writes the test's largest hostile files (300k empty strings where the architecture should be,
2**62 claimed strings in 49 bytes, 5,000 nested arrays, 200k tensor entries) and times
each refusal on an empty parse cache. Not a test: a loaded machine stretches the figures.
"""

from __future__ import annotations

import argparse
import statistics
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import swarm.shards.gguf as gguf_module
from swarm.errors import ShardError
from swarm.shards import ModelConfig
from swarm.shards.gguf import gguf_metadata, gguf_tensor_infos

UINT32, STRING, ARRAY = 4, 8, 9


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _header(tensors: int, kvs: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, tensors, kvs)


def cases() -> dict[str, tuple[bytes, Callable[[Path], object]]]:
    strings = 300_000
    entry = _string("") + struct.pack("<I", 1) + struct.pack("<Q", 0) + struct.pack("<IQ", 0, 0)
    nested = (
        _header(0, 1)
        + _string("nest")
        + struct.pack("<I", ARRAY)
        + struct.pack("<IQ", ARRAY, 1) * 5_000
        + struct.pack("<IQ", UINT32, 1)
        + b"\0" * 4
    )
    return {
        "2**62 strings in 49 bytes": (
            _header(0, 1) + _string("a") + struct.pack("<IIQ", ARRAY, STRING, 2**62),
            gguf_metadata,
        ),
        "300k empty strings": (
            _header(0, 1)
            + _string("general.architecture")
            + struct.pack("<IIQ", ARRAY, STRING, strings)
            + b"\0" * (8 * strings),
            ModelConfig.from_pretrained,
        ),
        "5,000 nested arrays": (nested, gguf_metadata),
        "200k tensor entries": (_header(200_000, 0) + entry * 200_000, gguf_tensor_infos),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name, (data, read) in cases().items():
            path = Path(tmp) / "bomb.gguf"
            path.write_bytes(data)
            times = []
            for _ in range(args.runs):
                gguf_module._cached_parse.cache_clear()
                began = time.perf_counter()
                try:
                    read(path)
                except ShardError:
                    pass
                else:
                    raise SystemExit(f"{name}: not refused")
                times.append(time.perf_counter() - began)
            print(f"{name:28} {len(data):>9} bytes  best {min(times) * 1000:7.1f} ms  "
                  f"median {statistics.median(times) * 1000:7.1f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
