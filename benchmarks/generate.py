"""Per-token latency of a swarm against the same model in one process (issue 5).

    python benchmarks/generate.py                 # everything below
    python benchmarks/generate.py --only chain    # just the 3-hop vs single-process ratio

1. chain: for a tiny model (hidden 256, 8 layers, vocab 32000) and a compute-heavy one
   (hidden 1024, 16 layers, vocab 32000, ~268 M params), one `swarm dht` and three
   `swarm serve` processes (one torch thread each) form a 3-hop chain; the client (this
   process) generates 32 greedy tokens after a 16-token prompt. Beside it, in this process,
   the same model runs alone (our shards, KV cache). Prints per-token medians, the ratio,
   and the per-hop overhead ((swarm - single) / hops), plus time to first token and the
   servers' start-up time to readiness.
2. links: an in-process swarm of the tiny model behind the link emulator, 25 ms one way
   between the client and every server and 2 ms between servers: per-token latency with
   server-to-server push against relaying every hop through the client.

Figures go in benchmarks/README.md. Not a test: nothing here asserts timings.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import trio

from swarm.client.config import ClientConfig, PipelineConfig
from swarm.client.model import AsyncRemoteModel
from swarm.lab.processes import ProcessGroup
from swarm.lab.reference import LocalModel
from swarm.testing.checkpoints import write_random_llama
from swarm.testing.links import LinkEmulator, LinkSpec
from swarm.testing.swarm import open_local_swarm
from swarm.types import LayerRange

PROMPT = list(range(100, 116))  # 16 tokens
NEW_TOKENS = 32
MODELS = {
    "tiny": {"num_layers": 8, "hidden": 256, "heads": 8, "kv_heads": 8, "intermediate": 688},
    "heavy": {"num_layers": 16, "hidden": 1024, "heads": 16, "kv_heads": 16, "intermediate": 2816},
}


async def measure(
    path: Path,
    config: ClientConfig,
    rounds: int,
    transport: object = None,
    baseline: LocalModel | None = None,
) -> dict[str, float]:
    """Median per-token seconds (after the first token) and time to first token of the
    swarm, and of `baseline` in this process, alternating round by round so that drift in
    the machine's load hits both alike."""
    times: dict[str, list[float]] = {"swarm": [], "swarm_ttft": [], "one": [], "one_ttft": []}
    async with AsyncRemoteModel.open(path, config, transport=transport) as model:  # type: ignore[arg-type]
        await model.generate(PROMPT, 4)  # warm up: connections, pings
        for _ in range(rounds):
            if baseline is not None:
                local = baseline.generate(PROMPT, NEW_TOKENS)
                times["one_ttft"].append(local.timings[0])
                times["one"].extend(local.timings[1:])
            result = await model.generate_detailed(PROMPT, NEW_TOKENS)
            times["swarm_ttft"].append(result.ttft)
            times["swarm"].extend(result.timings[1:])
    return {key: statistics.median(values) for key, values in times.items() if values}


def chain(name: str, workdir: Path, rounds: int) -> None:
    path = workdir / name
    if not (path / "config.json").exists():
        write_random_llama(path, seed=0, std=0.02, vocab=32000, **MODELS[name])
    layers = int(MODELS[name]["num_layers"])
    cuts = [0, layers // 3, 2 * layers // 3, layers]
    baseline = LocalModel(path)
    with ProcessGroup() as group:
        _, dht = group.start_dht()
        startups = []
        for i in range(3):
            started = time.perf_counter()
            group.start_server(
                f"s{i}",
                str(path),
                f"{cuts[i]}:{cuts[i + 1]}",
                dht,
                "--identity",
                str(workdir / f"id-{name}-{i}"),
            )
            startups.append(time.perf_counter() - started)
        config = ClientConfig(initial_peers=(dht,))
        m = trio.run(measure, path, config, rounds, None, baseline)
    print(
        f"[chain {name}] single {m['one'] * 1e3:.2f} ms/token, 3-hop swarm "
        f"{m['swarm'] * 1e3:.2f} ms/token, ratio {m['swarm'] / m['one']:.3f}, per-hop overhead "
        f"{(m['swarm'] - m['one']) / 3 * 1e3:.2f} ms; ttft single {m['one_ttft'] * 1e3:.1f} ms, "
        f"swarm {m['swarm_ttft'] * 1e3:.1f} ms; server start-up to ready "
        f"{statistics.median(startups):.2f} s (median of 3)",
        flush=True,
    )


async def links(workdir: Path, rounds: int) -> None:
    path = workdir / "tiny"
    if not (path / "config.json").exists():
        write_random_llama(path, seed=0, std=0.02, vocab=32000, **MODELS["tiny"])
    spans = [LayerRange(0, 3), LayerRange(3, 6), LayerRange(6, 8)]
    async with (
        LinkEmulator(LinkSpec(delay=0.002)) as emulator,
        open_local_swarm(path, links=emulator) as local,
    ):
        servers = [await local.add_server(s) for s in spans]
        for server in servers:
            emulator.set("client", server.address, LinkSpec(delay=0.025))
        results = {}
        for push in (True, False):
            config = ClientConfig(
                initial_peers=(local.dht_address,), pipeline=PipelineConfig(use_push=push)
            )
            m = await measure(path, config, rounds, emulator.transport("client"))
            results[push] = (m["swarm"], m["swarm_ttft"])
    (p, p_ttft), (r, r_ttft) = results[True], results[False]
    print(
        f"[links 25 ms client<->servers, 2 ms between servers] push {p * 1e3:.1f} ms/token, "
        f"relay through client {r * 1e3:.1f} ms/token, push/relay {p / r:.3f}; "
        f"ttft push {p_ttft * 1e3:.1f} ms, relay {r_ttft * 1e3:.1f} ms",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["chain", "links"], default=None)
    parser.add_argument("--models", default="tiny,heavy")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        if args.only in (None, "chain"):
            for name in args.models.split(","):
                chain(name, workdir, args.rounds)
        if args.only in (None, "links"):
            trio.run(links, workdir, args.rounds)


if __name__ == "__main__":
    main()
