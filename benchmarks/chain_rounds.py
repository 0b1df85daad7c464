"""Scheduling rounds, tasks and Python calls per token of the tiny 3-hop chain, in one process.

    python benchmarks/chain_rounds.py --rounds 3
    PYTHONPATH=/tmp/old PYTHONSAFEPATH=1 python benchmarks/chain_rounds.py --profile /tmp/p.prof

The three servers of `chain_cpu.py` (0:2, 2:5, 5:8 of the tiny model), their DHT and the
client all run in this process's trio loop (`swarm.testing.swarm.open_local_swarm`), so
every step crosses the whole RPC stack on real loopback sockets but no process waits for
another or for a core. Prints, per token (32 greedy tokens after a 16-token prompt per
round), trio's scheduling rounds (one per wait for I/O), the tasks spawned, and the Python
calls (cProfile): counts that the machine's load does not move, unlike the CPU time it also
prints (with the model in one process for scale). ``--profile PATH`` keeps the pstats file.
A code tree is compared as in `chain_cpu.py`. Not a test.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import trio

from swarm.client.model import AsyncRemoteModel
from swarm.lab.reference import LocalModel
from swarm.testing.checkpoints import write_random_llama
from swarm.testing.swarm import open_local_swarm
from swarm.types import LayerRange

PROMPT = list(range(100, 116))  # 16 tokens
TOKENS = 32
TINY = {"num_layers": 8, "hidden": 256, "heads": 8, "kv_heads": 8, "intermediate": 688}
RANGES = (LayerRange(0, 2), LayerRange(2, 5), LayerRange(5, 8))


class Counts(trio.abc.Instrument):
    """Scheduling rounds (I/O waits) and spawned tasks while installed."""

    def __init__(self) -> None:
        self.rounds = self.tasks = 0

    def before_io_wait(self, timeout: float) -> None:
        self.rounds += 1

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.tasks += 1


async def measure(path: Path, rounds: int, out: str) -> None:
    async with open_local_swarm(path, RANGES) as local:
        async with AsyncRemoteModel.open(path, local.client_config()) as model:
            await model.generate(PROMPT, 4)  # warm up: connections, pings, first timings
            await trio.sleep(1.0)
            alone = LocalModel(path)
            cpu = time.process_time()
            for _ in range(rounds):
                alone.generate(PROMPT, TOKENS)
            one = (time.process_time() - cpu) / (rounds * TOKENS)
            counts, profile = Counts(), cProfile.Profile()
            trio.lowlevel.add_instrument(counts)
            cpu, tokens = time.process_time(), 0
            profile.enable()
            for _ in range(rounds):
                tokens += len((await model.generate_detailed(PROMPT, TOKENS)).ids)
            profile.disable()
            chain = (time.process_time() - cpu) / tokens
            trio.lowlevel.remove_instrument(counts)
    profile.dump_stats(out)
    calls = pstats.Stats(out).total_calls  # type: ignore[attr-defined]
    print(
        f"[chain rounds] per token: {counts.rounds / tokens:.1f} scheduling rounds, "
        f"{counts.tasks / tokens:.1f} tasks spawned, {calls / tokens:.0f} Python calls; "
        f"CPU {chain * 1e3:.2f} ms under cProfile (one process {one * 1e3:.2f} ms without); "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", default=str(Path(tempfile.gettempdir()) / "chain-rounds.prof"))
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "swarm-bench")
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = args.workdir / "tiny"
    if not (path / "config.json").exists():
        write_random_llama(path, seed=0, std=0.02, vocab=32000, **TINY)
    trio.run(measure, path, args.rounds, args.profile)


if __name__ == "__main__":
    main()
