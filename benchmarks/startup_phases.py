"""Where a server's start-up goes, phase by phase, code trees alternated (issue 21).

    python benchmarks/startup_phases.py --code old=/tmp/old --code new=/tmp/new --starts 6
    python benchmarks/startup_phases.py --code old=/tmp/old --code new=. --timings cold

Like `benchmarks/startup.py` (heavy model, 0:8, a fresh `swarm dht` per start, HOME in the
work folder, DIR holding ``swarm`` and ``swarm_cli`` links to a checkout), but timing the
moment each progress line of ``swarm serve`` appears: until loading starts (interpreter,
imports, joining the DHT), until the reachability verdict, and from it to ready (the
first throughput estimate). The trees take turns, their order flipping each round. After a
start, a tree that keeps timings is given 8 s to measure online and keep them, as a
longer-running server would; ``--timings cold`` instead empties the kept timings before
every start (a first start on this machine). Not a test.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from startup import compile_tree, keeps_timings, model_path

PHASES = ("loading", "reachability:", "ready")


def start(tree: str, home: Path, model: Path, layers: str, cold: bool) -> dict[str, float]:
    """One start: seconds from the command to each phase's line (deadline 60 s)."""
    if cold:
        shutil.rmtree(home / ".cache" / "swarm" / "timings", ignore_errors=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", HOME=str(home), OMP_NUM_THREADS="1")
    if tree:
        env["PYTHONPATH"] = tree
        env["PYTHONSAFEPATH"] = "1"  # `python -m` would put the current folder first
    cmd = [sys.executable, "-m", "swarm_cli.main"]
    out = subprocess.PIPE
    dht = subprocess.Popen([*cmd, "dht"], stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
    server = None
    try:
        assert dht.stdout is not None
        found = None
        deadline = time.monotonic() + 60
        while found is None and time.monotonic() < deadline:
            found = re.search(r"listening on (\S+:\d+)", dht.stdout.readline())
        if found is None:
            raise RuntimeError("swarm dht did not start")
        began = time.perf_counter()
        argv = [*cmd, "serve", str(model), "--layers", layers, "--initial-peers", found.group(1)]
        server = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
        assert server.stdout is not None
        marks: dict[str, float] = {}
        while "ready" not in marks and time.monotonic() < deadline + 60:
            line = server.stdout.readline()
            if not line:
                break
            for phase in PHASES:
                if phase in line:
                    marks.setdefault(phase, time.perf_counter() - began)
        if keeps_timings(tree) and not cold:
            time.sleep(8)  # let it measure online and keep the result
        return marks
    finally:
        for proc in (server, dht):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--code", action="append", default=[], help="NAME=DIR")
    parser.add_argument("--starts", type=int, default=6)
    parser.add_argument("--layers", default="0:8")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "swarm-bench")
    parser.add_argument("--timings", choices=["kept", "cold"], default="kept")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = model_path("heavy", args.workdir)
    trees = [tuple(c.split("=", 1)) for c in args.code] or [("this", "")]
    for _, tree in trees:
        compile_tree(tree)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _ in trees}
    for i in range(args.starts):
        for name, tree in trees if i % 2 == 0 else trees[::-1]:
            home = args.workdir / "home" / name
            marks = start(tree, home, model, args.layers, args.timings == "cold")
            runs[name].append(marks)
            print(name, {k: round(v, 2) for k, v in marks.items()}, flush=True)
    print(f"load average {os.getloadavg()}")
    for name, marks in runs.items():
        done = [m for m in marks if all(p in m for p in PHASES)]
        print(
            f"[startup phases {args.layers}] {name}: ready median "
            f"{statistics.median(m['ready'] for m in done):.2f} s; until loading "
            f"{statistics.median(m['loading'] for m in done):.2f} s; reachability to ready "
            f"{statistics.median(m['ready'] - m['reachability:'] for m in done):.3f} s "
            f"(of {len(done)})",
            flush=True,
        )


if __name__ == "__main__":
    main()
