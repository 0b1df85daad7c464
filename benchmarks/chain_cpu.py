"""CPU, wake-ups and Python calls per token of every process of the tiny 3-hop chain (issue 21).

    python benchmarks/chain_cpu.py --rounds 4
    PYTHONPATH=/tmp/old PYTHONSAFEPATH=1 python benchmarks/chain_cpu.py --profile --out /tmp/p

One `swarm dht` and three `swarm serve` processes of the tiny model (0:2, 2:5, 5:8; one torch
thread each) and a client in this process (`generate.py`'s chain, 32 greedy tokens after a
16-token prompt per round). Prints, per token, the CPU seconds of the client and of each
server, and the voluntary context switches of each process's main thread (its event loop:
a switch is a wait for the network or the worker thread, so about one wake-up) and the time
it spent runnable but waiting for a core (``run_delay`` of Linux's
``/proc/PID/task/PID/schedstat``: on 2 cores shared by 5 processes, a woken process often
waits behind another; 0 where the file is missing). With
``--profile`` (needs ``pip install yappi``, not a dependency) every process is profiled
for the measured rounds only (CPU clock, all threads) and the profiles are saved as pstats
files ``OUT.client`` and ``OUT.s0``..``OUT.s2``; it prints the Python calls per token of
each, a count that the machine's load does not move (the CPU figures it does, a lot, and
the profiler slows everything ~2-3x). A code tree is compared by putting it first on
PYTHONPATH (DIR holding ``swarm`` and ``swarm_cli`` links, as in `startup.py`) with
``PYTHONSAFEPATH=1`` (the servers inherit both; without it their `python -m` puts the
current folder first, and from a checkout they import its ``swarm``). Not a test.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import psutil
import torch
import trio

from swarm.client.config import ClientConfig
from swarm.client.model import AsyncRemoteModel
from swarm.lab.processes import ProcessGroup, swarm_command
from swarm.testing.checkpoints import write_random_llama

PROMPT = list(range(100, 116))  # 16 tokens
TINY = {"num_layers": 8, "hidden": 256, "heads": 8, "kv_heads": 8, "intermediate": 688}
RANGES = ("0:2", "2:5", "5:8")
# `swarm` under yappi: SIGUSR1 starts the profile, the next SIGUSR1 stops and saves it
PROFILED_SWARM = """
import runpy, signal, sys
import yappi
out, on = sys.argv[1], [False]
yappi.set_clock_type("cpu")
def toggle(sig, frame):
    if not on[0]:
        yappi.clear_stats(); yappi.start(builtins=False); on[0] = True
    else:
        yappi.stop(); yappi.get_func_stats().save(out, type="pstat")
signal.signal(signal.SIGUSR1, toggle)
sys.argv = ["swarm", *sys.argv[2:]]
runpy.run_module("swarm_cli.main", run_name="__main__")
"""


def _run_delay(pid: int) -> float:
    """Seconds the main thread of ``pid`` spent runnable, waiting for a core (0: unknown)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/schedstat") as stat:
            return int(stat.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


async def measure(
    path: Path, dht: str, servers: list[psutil.Process], args: argparse.Namespace
) -> None:
    config = ClientConfig(initial_peers=(dht,))
    me = psutil.Process()
    async with AsyncRemoteModel.open(path, config) as model:
        await model.generate(PROMPT, 4)  # warm up: connections, pings
        await trio.sleep(1.0)
        if args.profile:
            import yappi

            for server in servers:
                os.kill(server.pid, signal.SIGUSR1)
            yappi.set_clock_type("cpu")
            yappi.start(builtins=False)
        switches = [p.num_ctx_switches().voluntary for p in [me, *servers]]
        delays = [_run_delay(p.pid) for p in [me, *servers]]
        cpu = [p.cpu_times() for p in servers]
        mine, wall = time.process_time(), time.perf_counter()
        tokens, steps = 0, []
        for _ in range(args.rounds):
            result = await model.generate_detailed(PROMPT, args.tokens)
            tokens += len(result.ids)
            steps += result.timings[1:]
        wall, mine = time.perf_counter() - wall, time.process_time() - mine
        delays = [_run_delay(p.pid) - d for p, d in zip([me, *servers], delays, strict=True)]
        cpu = [
            (b.user + b.system) - (a.user + a.system)
            for a, b in zip(cpu, [p.cpu_times() for p in servers], strict=True)
        ]
        switches = [
            b - a
            for a, b in zip(
                switches, [p.num_ctx_switches().voluntary for p in [me, *servers]], strict=True
            )
        ]
        if args.profile:
            yappi.stop()
            yappi.get_func_stats().save(f"{args.out}.client", type="pstat")
            for server in servers:
                os.kill(server.pid, signal.SIGUSR1)
            await trio.sleep(2.0)  # the servers save theirs
    print(
        f"load average {os.getloadavg()}; {tokens} tokens, wall {wall / tokens * 1e3:.2f} ms "
        f"a token (median step {statistics.median(steps) * 1e3:.2f} ms)",
        flush=True,
    )
    names = ["client", *(f"server {i}" for i in range(len(servers)))]
    cpus = [mine, *cpu]
    for i, name in enumerate(names):
        line = (
            f"[chain cpu] {name}: CPU {cpus[i] / tokens * 1e3:.2f} ms a token, main-thread "
            f"voluntary switches {switches[i] / tokens:.1f} a token, waited for a core "
            f"{delays[i] / tokens * 1e3:.2f} ms a token"
        )
        if args.profile:
            import pstats

            suffix = "client" if i == 0 else f"s{i - 1}"
            calls = pstats.Stats(f"{args.out}.{suffix}").total_calls  # type: ignore[attr-defined]
            line += f", Python calls {calls / tokens:.0f} a token"
        print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--profile", action="store_true", help="yappi (pip install yappi)")
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "chain-cpu"))
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "swarm-bench")
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = args.workdir / "tiny"
    if not (path / "config.json").exists():
        write_random_llama(path, seed=0, std=0.02, vocab=32000, **TINY)
    with ProcessGroup() as group:
        _, dht = group.start_dht()
        servers = []
        for i, layers in enumerate(RANGES):
            serve = ["serve", str(path), "--layers", layers, "--initial-peers", dht]
            if args.profile:
                argv = [sys.executable, "-c", PROFILED_SWARM, f"{args.out}.s{i}", *serve]
            else:
                argv = swarm_command(*serve)
            proc = group.start(f"s{i}", argv)
            proc.wait_for_line(r"\bready\b", 120)
            servers.append(psutil.Process(proc.pid))
        time.sleep(3.0)  # the servers' online measurements
        trio.run(measure, path, dht, servers, args)


if __name__ == "__main__":
    main()
