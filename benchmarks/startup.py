"""Server start-up to ready, and loading a layer range (issue 21, the latency budget).

    python benchmarks/startup.py                       # heavy model, 0:8, 3 starts
    python benchmarks/startup.py --model smollm2 --layers 10:20
    python benchmarks/startup.py --code old=/tmp/old --code new=.   # alternate code trees
    python benchmarks/startup.py --timings cold     # no timings kept from a previous start

Starts one `swarm dht`, then `swarm serve MODEL --layers L` again and again (one torch
thread), timing the command's start to its "ready" line (wall and the process's CPU
seconds, which a loaded machine inflates less), and stopping it each time. With
``--code NAME=DIR`` (repeatable) the starts alternate between code trees: DIR holds
``swarm`` and ``swarm_cli`` (symlinks to a checkout's ``swarm`` and ``cli``), put first on
PYTHONPATH, so two commits are compared on the same machine in one run (with
``PYTHONSAFEPATH=1``: `python -m` would otherwise put the current folder first, and run
from a checkout every tree would import that checkout's ``swarm``). Not a test.

The servers run with HOME in the work folder: ``--timings kept`` (the default) lets each
start find the timings the previous one measured (``~/.cache/swarm/timings``, as a user's
restarts do: the first start of a run measures, the others do not), ``--timings cold``
empties that folder before every start. Each code tree's modules are compiled to bytecode
first (``__pycache__`` beside them, ignored by git), as an installed package has them;
``--no-bytecode`` leaves that out (where ``PYTHONDONTWRITEBYTECODE`` is set, every start
then compiles ~110 modules from source: 0.3-0.4 s measured here). Not with
``PYTHONPYCACHEPREFIX``: that hides the site-packages' own bytecode (torch compiled from
source at every start: 8 CPU seconds to ready).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from swarm.lab.processes import ProcessGroup
from swarm.testing.checkpoints import write_random_llama

HEAVY = {"num_layers": 16, "hidden": 1024, "heads": 16, "kv_heads": 16, "intermediate": 2816}


def model_path(name: str, workdir: Path) -> Path:
    if name == "smollm2":
        from swarm.shards.bundled import default_model_path

        return Path(default_model_path())
    path = workdir / "heavy"
    if not (path / "config.json").exists():
        write_random_llama(path, seed=0, std=0.02, vocab=32000, **HEAVY)
    return path


def source_dirs(tree: str) -> list[Path]:
    """The package folders a code tree's servers import (``""``: this checkout's)."""
    if tree:
        return [Path(tree) / "swarm", Path(tree) / "swarm_cli"]
    root = Path(__file__).resolve().parent.parent
    return [root / "swarm", root / "cli"]


def compile_tree(tree: str) -> None:
    """Bytecode for the tree's modules, where its servers look for it."""
    dirs = [str(d) for d in source_dirs(tree)]
    subprocess.run([sys.executable, "-m", "compileall", "-q", *dirs], check=True)


def keeps_timings(tree: str) -> bool:
    """Whether the tree's servers keep their timings (code before that keeps none)."""
    return (source_dirs(tree)[0] / "server" / "timings_store.py").exists()


def wait_for_timings(folder: Path, after: float, timeout: float) -> bool:
    """Wait (up to ``timeout`` s) until the server keeps timings newer than ``after``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(f.stat().st_mtime > after for f in folder.glob("*.json")):
            return True
        time.sleep(0.2)
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="heavy", choices=["heavy", "smollm2"])
    parser.add_argument("--layers", default="0:8")
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--code", action="append", default=[], help="NAME=DIR")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "swarm-bench")
    parser.add_argument("--timings", choices=["kept", "cold"], default="kept")
    parser.add_argument("--no-bytecode", action="store_true")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    path = model_path(args.model, args.workdir)
    trees = [tuple(c.split("=", 1)) for c in args.code] or [("this", "")]
    home = args.workdir / "home"
    envs: dict[str, dict[str, str]] = {}
    for name, tree in trees:
        env = {"HOME": str(home / name)}
        if tree:
            env["PYTHONPATH"] = tree
            env["PYTHONSAFEPATH"] = "1"  # `python -m` would put the current folder first
        if not args.no_bytecode:
            compile_tree(tree)
        envs[name] = env
        shutil.rmtree(home / name / ".cache" / "swarm" / "timings", ignore_errors=True)
    times: dict[str, list[float]] = {name: [] for name, _ in trees}
    cpu_times: dict[str, list[float]] = {name: [] for name, _ in trees}
    keeps = {name: args.timings == "kept" and keeps_timings(tree) for name, tree in trees}
    for i in range(args.starts):
        for name, _ in trees:
            # a DHT of its own per start: a DHT that still lists the previous start's (dead)
            # server makes every lookup wait out that peer's timeouts (measured: 4.3 s to
            # ready on a fresh DHT, 15.8 s on one that knew a dead server)
            with ProcessGroup() as group:
                _, dht = group.start_dht()
                if args.timings == "cold":
                    shutil.rmtree(home / name / ".cache" / "swarm", ignore_errors=True)
                runner = ProcessGroup(env=envs[name])
                with runner:
                    started, started_at = time.perf_counter(), time.time()
                    proc = runner.start_server(
                        f"{name}{i}", str(path), args.layers, dht, "--identity-name", f"b{i}{name}"
                    )
                    times[name].append(time.perf_counter() - started)
                    cpu = psutil.Process(proc.pid).cpu_times()
                    cpu_times[name].append(cpu.user + cpu.system)
                    if keeps[name]:  # let it measure online and keep that, as a longer run would
                        folder = home / name / ".cache" / "swarm" / "timings"
                        keeps[name] = wait_for_timings(folder, started_at, 90.0)
    for name, values in times.items():
        print(
            f"[startup {args.model} {args.layers}] {name}: "
            f"median {statistics.median(values):.2f} s "
            f"(of {len(values)}: {', '.join(f'{v:.2f}' for v in values)}); CPU seconds to "
            f"ready: median {statistics.median(cpu_times[name]):.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
