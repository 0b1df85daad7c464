"""Span timings kept between starts, so a restarted server goes online without measuring.

A server measures its span once online (`swarm.server.capacity.SpanMeasurement`) and keeps
the result here, one small JSON file per `TimingsKey`: the checkpoint (its model id, a
digest of its contents), the layer range, the weights' format, the dtype, the device (its
model name), the torch thread count and the versions of torch and swarm. The next start with
the same key announces the stored timings as its first estimate at once, instead of timing
one layer before going online (`swarm.server.capacity.estimate_span`), and measures again
once online (re-announcing the result); anything else (another key, a file that is not
ours, unreadable, or with values out of range) is a miss, and the server estimates from one
layer as without a store.

The stored figure is an estimate like any first one: it never refuses work
(`swarm.server.handlers.ServingState.timings_final`), the server replaces it within seconds,
and peers' probes check what a server delivers whatever it announces.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from swarm._version import __version__
from swarm.server.capacity import SpanTimings
from swarm.types import LayerRange

__all__ = ["TimingsKey", "TimingsStore", "device_description"]

log = logging.getLogger(__name__)

FORMAT = 1
MAX_FILE_BYTES = 64 * 1024  # a stored file is well under 2 KiB: a bigger one is not ours
MAX_POINTS = 64


@functools.cache
def _cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return "unknown"
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return "unknown"


def device_description(device: torch.device) -> str:
    """The device as timings depend on it: the GPU's name, or the CPU's model and core
    count."""
    if device.type == "cuda":
        return f"cuda {torch.cuda.get_device_name(device)}"
    return f"{device.type} {_cpu_model()} x{os.cpu_count()}"


@dataclass(frozen=True)
class TimingsKey:
    """Everything a span's measured timings depend on (see the module docstring)."""

    model_id: str
    layers: LayerRange
    dtype: str
    quantization: str
    device: str
    num_threads: int
    torch_version: str = torch.__version__
    swarm_version: str = __version__

    def as_json(self) -> dict[str, Any]:
        fields = asdict(self)
        fields["layers"] = [self.layers.start, self.layers.stop]
        return fields

    def file_name(self) -> str:
        canonical = json.dumps(self.as_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:32] + ".json"


class TimingsStore:
    """Timings kept in ``folder`` (created when first written). Never raises: a store that
    cannot be read or written only costs a measurement."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder.expanduser()

    def load(self, key: TimingsKey) -> SpanTimings | None:
        """The timings stored under ``key``, or None (none, or not valid for it)."""
        path = self.folder / key.file_name()
        try:
            with path.open("rb") as file:
                data = file.read(MAX_FILE_BYTES + 1)
        except OSError:
            return None
        if len(data) > MAX_FILE_BYTES:
            log.info("stored timings %s: too large, ignored", path)
            return None
        try:
            record = json.loads(data)
            timings = _decode(record, key)
        except (ValueError, TypeError, KeyError) as exc:
            log.info("stored timings %s ignored: %s", path, exc)
            return None
        return timings

    def save(self, key: TimingsKey, timings: SpanTimings) -> None:
        """Keep ``timings`` under ``key`` (written whole: a new file renamed over the old)."""
        record = {
            "format": FORMAT,
            "key": key.as_json(),
            "decode": [list(point) for point in timings.decode],
            "chunks": [list(point) for point in timings.chunks],
            "flops_per_token": timings.flops_per_token,
            "flops_per_pair": timings.flops_per_pair,
        }
        path = self.folder / key.file_name()
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            temporary.write_text(json.dumps(record, sort_keys=True))
            temporary.replace(path)
        except OSError as exc:
            log.info("could not keep the measured timings in %s: %s", self.folder, exc)
            temporary.unlink(missing_ok=True)


def _decode(record: Any, key: TimingsKey) -> SpanTimings:
    """A stored record as `SpanTimings`; raises ValueError/TypeError/KeyError when it is not
    a record of ours for ``key`` or a value is out of range."""
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError("not a timings record of this format")
    if record["key"] != key.as_json():
        raise ValueError("stored for another model, range, device or version")
    decode, chunks = _points(record["decode"]), _points(record["chunks"])
    if decode[0][0] != 1:
        raise ValueError("decode timings must start at one session")
    flops = (float(record["flops_per_token"]), float(record["flops_per_pair"]))
    if not all(math.isfinite(f) and f > 0 for f in flops):
        raise ValueError("FLOP counts must be finite and positive")
    return SpanTimings(decode, chunks, *flops)


def _points(raw: Any) -> tuple[tuple[int, float], ...]:
    """(size, seconds) pairs: 1 to MAX_POINTS of them, sizes ascending, seconds finite and
    positive."""
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_POINTS:
        raise ValueError(f"expected 1 to {MAX_POINTS} timing points")
    points: list[tuple[int, float]] = []
    for pair in raw:
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or type(pair[0]) is not int
            or type(pair[1]) not in (int, float)
        ):
            raise ValueError("a timing point is [size, seconds]")
        size, seconds = pair[0], float(pair[1])
        if size < 1 or not (math.isfinite(seconds) and 0 < seconds < 3600):
            raise ValueError(f"timing point {pair} out of range")
        if points and size <= points[-1][0]:
            raise ValueError("timing sizes must ascend")
        points.append((size, seconds))
    return tuple(points)
