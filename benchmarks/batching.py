"""Concurrent sessions on a 2-server chain, batching on vs off (issue 11).

    python benchmarks/batching.py                       # 1,2,4,8,16 sessions, on and off
    python benchmarks/batching.py --levels 1,8 --new-tokens 16 --dtypes bfloat16

The heavy model (hidden 1024, 16 layers, 16 heads, intermediate 2816, random weights,
~0.8 GB float32) is written to ``--workdir`` (default /tmp/swarm-batching). Its vocabulary
is 2048 rather than 32000: every user's client computes the lm_head once per token, and
16 clients' 32000 x 1024 heads on the same two cores as the servers would measure the
clients, not the servers (on a real swarm each user has a machine of their own). For
each dtype and mode, one `swarm dht` and two `swarm serve` processes (layers 0:8 and 8:16,
one torch thread each, ``--dtype``; ``--no-batching`` for "off") form the chain. Both
float32 and bfloat16 run by default: on a CPU whose matrix kernels take twice as long for
two rows as for one (MKL's float32 here), batching cannot give what it gives where a step
is bound by reading the weights (bfloat16 here, every model on a GPU).

The users are 16 client processes (this script with ``--worker``), each holding the head
and one session at a time. ``--clients one`` runs every session instead from one client
process, as trio tasks of one ``AsyncRemoteModel`` (the gateway's case, and a README user's
with several threads): their head forwards are batched (`swarm.client.heads`), and the
figure to compare is its ``x1-session`` column against the many-process one (issue 21
item 5: within 15 %). For each level, that many
workers run one greedy generation each, all released at once; wall time runs from the
release to the last answer.

Prints one row per (mode, level): aggregate tokens/s (new tokens of all sessions / wall),
per-token latency p50/p95 over all sessions' steps, TTFT p50, and the ratios to the
single-session row of the same mode. Not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import trio

from swarm.client.config import ClientConfig
from swarm.client.model import AsyncRemoteModel
from swarm.lab.processes import ProcessGroup
from swarm.testing.checkpoints import write_random_llama

HEAVY = {"num_layers": 16, "hidden": 1024, "heads": 16, "kv_heads": 16, "intermediate": 2816}
WORKERS = 16


async def worker(path: Path, dht: str, prompt: int, new: int) -> None:
    """Wait for a line on stdin, run one generation, print its timings as JSON; repeat."""
    config = ClientConfig(initial_peers=(dht,), step_timeout=300.0)
    async with AsyncRemoteModel.open(path, config) as model:
        await model.generate(list(range(3, 3 + prompt)), 2)  # warm-up: connections, pings
        print("ready", flush=True)
        while line := await trio.to_thread.run_sync(sys.stdin.readline):
            seed = int(line)
            ids = [3 + (seed * 7919 + k * 31) % 2000 for k in range(prompt)]
            result = await model.generate_detailed(ids, new)
            out = {"ttft": result.ttft, "steps": result.timings[1:], "tokens": len(result.ids)}
            print(json.dumps(out), flush=True)


async def many_worker(path: Path, dht: str, prompt: int, new: int) -> None:
    """``--clients one``: wait for a line ``n`` on stdin, run n generations at once from this
    one client, print their timings as a JSON list; repeat."""
    config = ClientConfig(initial_peers=(dht,), step_timeout=300.0)
    async with AsyncRemoteModel.open(path, config) as model:
        await model.generate(list(range(3, 3 + prompt)), 2)  # warm-up: connections, pings
        print("ready", flush=True)
        while line := await trio.to_thread.run_sync(sys.stdin.readline):
            outs: list[dict[str, object]] = []
            async with trio.open_nursery() as nursery:
                for seed in range(int(line)):
                    nursery.start_soon(_one_of_many, model, seed, prompt, new, outs)
            print(json.dumps(outs), flush=True)


async def _one_of_many(
    model: AsyncRemoteModel, seed: int, prompt: int, new: int, outs: list[dict[str, object]]
) -> None:
    ids = [3 + (seed * 7919 + k * 31) % 2000 for k in range(prompt)]
    result = await model.generate_detailed(ids, new)
    outs.append({"ttft": result.ttft, "steps": result.timings[1:], "tokens": len(result.ids)})


def _quantile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def run_mode(
    path: Path, dtype: str, batching: bool, args: argparse.Namespace
) -> list[dict[str, float]]:
    extra = ("--dtype", dtype) + (() if batching else ("--no-batching",))
    levels = [int(x) for x in args.levels.split(",")]
    rows = []
    with ProcessGroup() as group:
        _, dht = group.start_dht()
        for i, layers in enumerate(("0:8", "8:16")):
            group.start_server(f"s{i}", str(path), layers, dht, *extra, timeout=600.0)
        argv = [
            sys.executable,
            __file__,
            "--worker",
            dht,
            "--workdir",
            str(args.workdir),
            "--prompt-length",
            str(args.prompt_length),
            "--new-tokens",
            str(args.new_tokens),
        ]
        one_client = args.clients == "one"
        if one_client:
            argv[2] = "--many-worker"
        workers = [
            subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for _ in range(1 if one_client else max(levels))
        ]
        try:
            for w in workers:
                assert w.stdout is not None and w.stdout.readline().strip() == "ready"
            time.sleep(args.settle)  # the servers measure their capacity once online
            for n in levels:
                started = time.perf_counter()
                if one_client:
                    workers[0].stdin.write(f"{n}\n")  # type: ignore[union-attr]
                    workers[0].stdin.flush()  # type: ignore[union-attr]
                    results = json.loads(workers[0].stdout.readline())  # type: ignore[union-attr]
                else:
                    for i, w in enumerate(workers[:n]):
                        w.stdin.write(f"{i}\n")  # type: ignore[union-attr]
                        w.stdin.flush()  # type: ignore[union-attr]
                    results = [json.loads(w.stdout.readline()) for w in workers[:n]]  # type: ignore[union-attr]
                wall = time.perf_counter() - started
                steps = [s for r in results for s in r["steps"]]
                rows.append(
                    {
                        "sessions": n,
                        "tokens_per_second": sum(r["tokens"] for r in results) / wall,
                        "token_p50": statistics.median(steps),
                        "token_p95": _quantile(steps, 95),
                        "ttft_p50": statistics.median(r["ttft"] for r in results),
                    }
                )
                done = f"{dtype} {mode_name(batching)} {args.clients}: {n} sessions done"
                print(f"  {done}", flush=True)
        finally:
            for w in workers:
                w.kill()
    return rows


def mode_name(batching: bool) -> str:
    return "on" if batching else "off"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--levels", default="1,2,4,8,16")
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/swarm-batching"))
    parser.add_argument("--modes", default="on,off")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--clients", choices=["processes", "one"], default="processes")
    parser.add_argument("--settle", type=float, default=30.0, help="seconds before the first level")
    parser.add_argument("--worker", metavar="DHT", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--many-worker", metavar="DHT", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = args.workdir / "heavy-v2048"
    if args.worker:
        trio.run(worker, path, args.worker, args.prompt_length, args.new_tokens)
        return
    if args.many_worker:
        trio.run(many_worker, path, args.many_worker, args.prompt_length, args.new_tokens)
        return
    if not (path / "config.json").exists():
        write_random_llama(path, seed=0, std=0.02, vocab=2048, **HEAVY)  # type: ignore[arg-type]
    print(
        "dtype     mode  sessions  tokens/s  x1-session  per-token p50  p95      x1-session"
        "  TTFT p50"
    )
    for dtype in args.dtypes.split(","):
        for mode in args.modes.split(","):
            rows = run_mode(path, dtype, mode == "on", args)
            base = rows[0]
            for row in rows:
                print(
                    f"{dtype:<8}  {mode:<4}  {row['sessions']:>8}  "
                    f"{row['tokens_per_second']:>8.1f}  "
                    f"{row['tokens_per_second'] / base['tokens_per_second']:>9.2f}x  "
                    f"{row['token_p50'] * 1e3:>10.1f} ms  {row['token_p95'] * 1e3:>6.1f} ms  "
                    f"{row['token_p50'] / base['token_p50']:>9.2f}x  "
                    f"{row['ttft_p50'] * 1e3:>7.1f} ms",
                    flush=True,
                )


if __name__ == "__main__":
    main()
