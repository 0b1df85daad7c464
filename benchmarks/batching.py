"""Concurrent sessions on a 2-server chain, batching on vs off (issue 11).

    python benchmarks/batching.py                       # 1,2,4,8,16 sessions, on and off
    python benchmarks/batching.py --levels 1,8 --new-tokens 16

The heavy model (hidden 1024, 16 layers, 16 heads, intermediate 2816, vocab 32000, random
weights, ~1.1 GB float32) is written to ``--workdir`` (default /tmp/swarm-batching). For
each mode, one `swarm dht` and two `swarm serve` processes (layers 0:8 and 8:16, one torch
thread each; ``--no-batching`` for "off") form the chain; this process is the client and
runs, for each level, that many greedy generations at once (`swarm_cli.bench.run_level`,
the code behind `swarm bench`), after one warm-up generation.

Prints one row per (mode, level): aggregate tokens/s, per-token latency p50/p95, TTFT p50,
and the ratios to the single-session row of the same mode. Not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import trio
from swarm_cli.bench import BenchRow, run_level

from swarm.client.config import ClientConfig
from swarm.client.model import AsyncRemoteModel
from swarm.testing.checkpoints import write_random_llama
from swarm.testing.processes import ProcessGroup

HEAVY = {"num_layers": 16, "hidden": 1024, "heads": 16, "kv_heads": 16, "intermediate": 2816}


async def sweep(path: Path, dht: str, levels: list[int], prompt: int, new: int) -> list[BenchRow]:
    config = ClientConfig(initial_peers=(dht,), step_timeout=300.0)
    rows = []
    async with AsyncRemoteModel.open(path, config) as model:
        await model.generate(list(range(3, 3 + prompt)), 4)  # warm-up: connections, pings
        for sessions in levels:
            rows.append(await run_level(model, sessions, prompt, new))
            print(f"  {sessions} sessions done", flush=True)
    return rows


def run_mode(path: Path, batching: bool, args: argparse.Namespace) -> list[BenchRow]:
    extra = () if batching else ("--no-batching",)
    with ProcessGroup() as group:
        _, dht = group.start_dht()
        for i, layers in enumerate(("0:8", "8:16")):
            group.start_server(f"s{i}", str(path), layers, dht, *extra, timeout=600.0)
        levels = [int(x) for x in args.levels.split(",")]
        return trio.run(sweep, path, dht, levels, args.prompt_length, args.new_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--levels", default="1,2,4,8,16")
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/swarm-batching"))
    parser.add_argument("--modes", default="on,off")
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = args.workdir / "heavy"
    if not (path / "config.json").exists():
        write_random_llama(path, seed=0, std=0.02, vocab=32000, **HEAVY)  # type: ignore[arg-type]
    print("mode  sessions  tokens/s  x1-session  per-token p50  p95      x1-session  TTFT p50")
    for mode in args.modes.split(","):
        rows = run_mode(path, mode == "on", args)
        base = rows[0]
        for row in rows:
            print(
                f"{mode:<4}  {row.sessions:>8}  {row.tokens_per_second:>8.1f}  "
                f"{row.tokens_per_second / base.tokens_per_second:>9.2f}x  "
                f"{row.token_p50 * 1e3:>10.1f} ms  {row.token_p95 * 1e3:>6.1f} ms  "
                f"{row.token_p50 / base.token_p50:>9.2f}x  {row.ttft_p50 * 1e3:>7.1f} ms",
                flush=True,
            )


if __name__ == "__main__":
    main()
