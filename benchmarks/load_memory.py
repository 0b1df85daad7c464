"""Peak memory and time to load a layer range vs the whole model (issue 2, item 5).

Writes a ~400 MB float32 Llama checkpoint with our own writer (hidden 1024, 24 layers), then
loads, each in a fresh subprocess: nothing (import baseline), span [0:6), and the whole model
(all layers + head). Prints each process's peak RSS, the ratios, and the load times.

    python benchmarks/load_memory.py [--layers-per-file N] [--dir DIR]

Peak RSS is the child's ``VmHWM`` (``/proc/self/status``; ``ru_maxrss`` would carry over
the parent's peak through fork+exec); the file is in the page cache (just written), so load
times are warm-cache times.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, VOCAB = 1024, 24, 16, 4, 512, 2048


def child(path: str, what: str) -> None:
    """Load ``what`` ("none", "span:A:B" or "whole") and print a JSON line of measurements."""
    import torch

    from swarm.shards import load_head, load_span
    from swarm.types import LayerRange

    torch.set_num_threads(1)
    before = _peak_rss_kib()
    start = time.perf_counter()
    loaded: list[torch.nn.Module] = []
    if what.startswith("span:"):
        loaded.append(load_span(path, LayerRange.parse(what.removeprefix("span:"))))
    elif what == "whole":
        loaded.append(load_span(path, LayerRange(0, LAYERS)))
        loaded.append(load_head(path))
    seconds = time.perf_counter() - start
    params = sum(p.numel() * p.element_size() for m in loaded for p in m.parameters())
    loaded_kib = _peak_rss_kib()
    # safetensors may hand back tensors backed by the file's mmap, resident only once read:
    # read every weight, as serving would, and measure again.
    for module in loaded:
        for p in module.parameters():
            float(p.sum())
    peak = _peak_rss_kib()
    result = {"before_kib": before, "loaded_kib": loaded_kib, "peak_kib": peak}
    print(json.dumps({**result, "seconds": seconds, "bytes": params}))


def _peak_rss_kib() -> int:
    """This process's peak resident set size (``VmHWM``) in KiB; Linux only."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def measure(path: Path, what: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(path), what],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers-per-file", type=int, default=None)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--child", nargs=2, metavar=("PATH", "WHAT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    from swarm.testing.checkpoints import write_random_llama

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        start = time.perf_counter()
        path = write_random_llama(
            Path(tmp) / "bench-llama",
            num_layers=LAYERS,
            hidden=HIDDEN,
            heads=HEADS,
            kv_heads=KV_HEADS,
            intermediate=INTERMEDIATE,
            vocab=VOCAB,
            layers_per_file=args.layers_per_file,
        )
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        print(
            f"checkpoint: {size / 2**20:.0f} MiB float32, hidden {HIDDEN}, {LAYERS} layers, "
            f"{len(list(path.glob('*.safetensors')))} file(s), written in "
            f"{time.perf_counter() - start:.1f} s"
        )
        base = measure(path, "none")
        span = measure(path, "span:0:6")
        whole = measure(path, "whole")
    mib = 1024.0
    print(
        f"{'load':<14}{'weights MiB':>12}{'peak after load':>17}{'after reading':>15}"
        f"{'over baseline':>15}{'load s':>8}   (RSS in MiB)"
    )
    for name, m in (("import only", base), ("span [0:6)", span), ("whole model", whole)):
        extra = (m["peak_kib"] - base["peak_kib"]) / mib
        print(
            f"{name:<14}{m['bytes'] / 2**20:>12.0f}{m['loaded_kib'] / mib:>17.0f}"
            f"{m['peak_kib'] / mib:>15.0f}{extra:>15.0f}{m['seconds']:>8.2f}"
        )
    ratio = span["peak_kib"] / whole["peak_kib"]
    extra_ratio = (span["peak_kib"] - base["peak_kib"]) / (whole["peak_kib"] - base["peak_kib"])
    print(
        f"peak RSS ratio span/whole: {ratio:.3f}; over the import baseline: {extra_ratio:.3f} "
        f"(6/24 = {6 / 24:.3f})"
    )
    print(f"load time ratio span/whole: {span['seconds'] / whole['seconds']:.3f}")


if __name__ == "__main__":
    main()
