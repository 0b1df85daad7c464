"""Per-hop overhead of a 3-hop tiny chain, code trees (or server options) alternated (issue 21).

    python benchmarks/hops.py --code old=/tmp/old --code new=/tmp/new --rounds 12
    python benchmarks/hops.py --code batch=. --code nobatch=. --extra "nobatch=--no-batching"

Each variant gets a `swarm dht` and three `swarm serve` processes of the tiny model (0:2,
2:5, 5:8; one torch thread each) from its code tree (DIR holds ``swarm`` and ``swarm_cli``
links to a checkout, put first on PYTHONPATH; ``.`` or nothing: this checkout), all running
at once; this process holds one client per chain (this checkout's client code) and the
model in one process. Each round generates 32 greedy tokens after a 16-token prompt on every
chain, the order of the variants flipping each round, and once in one process. Prints the
median per-token time of each chain and its per-hop overhead ((chain - one process) / 3).
Not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import trio

from swarm.client.config import ClientConfig
from swarm.client.model import AsyncRemoteModel
from swarm.lab.processes import ProcessGroup
from swarm.lab.reference import LocalModel
from swarm.testing.checkpoints import write_random_llama

PROMPT = list(range(100, 116))  # 16 tokens
NEW_TOKENS = 32
TINY = {"num_layers": 8, "hidden": 256, "heads": 8, "kv_heads": 8, "intermediate": 688}
RANGES = ("0:2", "2:5", "5:8")


async def measure(
    path: Path, dhts: dict[str, str], rounds: int, baseline: LocalModel
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in [*dhts, "one"]}
    names = list(dhts)
    async with AsyncExitStack() as stack:
        models = {}
        for name, dht in dhts.items():
            config = ClientConfig(initial_peers=(dht,))
            models[name] = await stack.enter_async_context(AsyncRemoteModel.open(path, config))
            await models[name].generate(PROMPT, 4)  # warm up: connections, pings
        for i in range(rounds):
            times["one"].extend(baseline.generate(PROMPT, NEW_TOKENS).timings[1:])
            for name in names if i % 2 == 0 else names[::-1]:
                result = await models[name].generate_detailed(PROMPT, NEW_TOKENS)
                times[name].extend(result.timings[1:])
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--code", action="append", default=[], help="NAME=DIR")
    parser.add_argument("--extra", action="append", default=[], help="NAME=SERVE ARGS")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--settle", type=float, default=3.0, help="s for online measurements")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "swarm-bench")
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = args.workdir / "tiny"
    if not (path / "config.json").exists():
        write_random_llama(path, seed=0, std=0.02, vocab=32000, **TINY)
    trees = dict(c.split("=", 1) for c in args.code) or {"this": ""}
    extra = {name: value.split() for name, value in (e.split("=", 1) for e in args.extra)}
    baseline = LocalModel(path)
    groups, dhts = [], {}
    try:
        for name, tree in trees.items():
            # PYTHONSAFEPATH: `python -m` would put the current folder (a checkout?) first
            env = {"PYTHONPATH": tree, "PYTHONSAFEPATH": "1"} if tree not in ("", ".") else None
            group = ProcessGroup(env=env)
            groups.append(group)
            _, dhts[name] = group.start_dht()
            flags = extra.get(name, [])
            for i, layers in enumerate(RANGES):
                group.start_server(f"{name}{i}", str(path), layers, dhts[name], *flags)
        time.sleep(args.settle)
        times = trio.run(measure, path, dhts, args.rounds, baseline)
    finally:
        for group in groups:
            group.stop_all()
    one = statistics.median(times["one"])
    print(f"load average {os.getloadavg()}; one process {one * 1e3:.2f} ms/token", flush=True)
    for name in trees:
        chain = statistics.median(times[name])
        print(
            f"[hops tiny] {name}: {chain * 1e3:.2f} ms/token, per-hop "
            f"{(chain - one) / 3 * 1e3:.2f} ms",
            flush=True,
        )


if __name__ == "__main__":
    main()
