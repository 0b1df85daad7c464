"""Through the gateway (`swarm api`) vs `AsyncRemoteModel` directly, on the same swarm (issue 10).

    python benchmarks/gateway.py                    # concurrency 1, 4 and 16
    python benchmarks/gateway.py --rounds 5 --tokens 48
    python benchmarks/gateway.py --in-process        # the gateway's own cost, one process

One `swarm dht`, two `swarm serve` processes (the bundled swarm-demo model split [0,3) and
[3,6), one torch thread each) and one `swarm api` process. This process then runs, round by
round and alternating so that drift in the machine's load hits both alike, C concurrent
greedy generations of the same prompt:

- direct: `AsyncRemoteModel.stream` in this process;
- gateway: ``POST /v1/completions`` with ``"stream": true`` from an HTTP client in this
  process, each server-sent event taken as it arrives.

For each it prints time to first token (request sent -> first token here) and the time
between tokens after the first, p50 and p95 over all requests of all rounds, and the
aggregate tokens per second (all tokens of a round / the round's wall time).
``--in-process`` runs servers, gateway and both clients in this process instead, which
leaves out the gateway path's extra process hop and shows what the gateway's code costs.
Not a test: nothing here asserts timings.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import httpx2 as httpx
import torch
import trio

from swarm.api import GatewayConfig, serve_gateway
from swarm.client.config import ClientConfig, RecordsConfig
from swarm.client.model import AsyncRemoteModel, Token
from swarm.lab.processes import ProcessGroup, swarm_command
from swarm.shards.bundled import demo_model_path
from swarm.testing.swarm import open_local_swarm
from swarm.types import LayerRange

PROMPT = "The list"


@dataclass
class Figures:
    """What one way of calling measured over all its rounds."""

    ttft: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)  # tokens/s of each round
    tokens: int = 0


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _direct_one(model: AsyncRemoteModel, tokens: int, out: Figures) -> None:
    sent = time.perf_counter()
    last = None
    async with model.stream(PROMPT, tokens) as stream:
        async for event in stream:
            if not isinstance(event, Token):
                continue
            now = time.perf_counter()
            if last is None:
                out.ttft.append(now - sent)
            else:
                out.gaps.append(now - last)
            last = now
            out.tokens += 1


async def _gateway_one(http: httpx.AsyncClient, name: str, tokens: int, out: Figures) -> None:
    body = {"model": name, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True}
    sent = time.perf_counter()
    last = None
    async with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if not chunk.get("choices") or not chunk["choices"][0].get("text"):
                continue  # the finish and usage chunks carry no token
            now = time.perf_counter()
            if last is None:
                out.ttft.append(now - sent)
            else:
                out.gaps.append(now - last)
            last = now
            out.tokens += 1


async def _round(concurrency: int, one: object, out: Figures) -> None:
    before = out.tokens
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(one, out)  # type: ignore[arg-type]
    out.rates.append((out.tokens - before) / (time.perf_counter() - started))


async def run(dht: str, url: str, name: str, rounds: int, tokens: int) -> None:
    """Measure against the gateway process at ``url``, with a client of this process."""
    config = ClientConfig(initial_peers=(dht,), records=RecordsConfig(reputation_path=None))
    async with AsyncRemoteModel.open(demo_model_path(), config) as model:
        await measure(model, url, name, rounds, tokens)


async def run_in_process(rounds: int, tokens: int) -> None:
    """Servers, gateway and both clients in this process and trio loop: what the gateway's
    own code costs, without the extra process hop and its wake-ups."""
    path = demo_model_path()
    async with open_local_swarm(path, [LayerRange(0, 3), LayerRange(3, 6)]) as local:
        config = ClientConfig(
            initial_peers=(local.dht_address,), records=RecordsConfig(reputation_path=None)
        )
        async with AsyncRemoteModel.open(path, config) as model, trio.open_nursery() as nursery:
            gateway = functools.partial(
                serve_gateway, model, GatewayConfig(port=0, max_concurrent=16), canary_s=0
            )
            ready = await nursery.start(gateway)
            await measure(model, ready.url, "swarm-demo", rounds, tokens)
            nursery.cancel_scope.cancel()


async def measure(model: AsyncRemoteModel, url: str, name: str, rounds: int, tokens: int) -> None:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        await model.generate(PROMPT, 4)  # warm up both paths: channels, caches
        await _gateway_one(http, name, 4, Figures())
        print(
            f"{'':>12} {'TTFT p50':>9} {'p95':>7} {'per token p50':>14} {'p95':>7} {'tokens/s':>9}"
        )
        for concurrency in (1, 4, 16):
            direct, gateway = Figures(), Figures()
            for _ in range(rounds):
                await _round(concurrency, lambda o: _direct_one(model, tokens, o), direct)
                await _round(concurrency, lambda o: _gateway_one(http, name, tokens, o), gateway)
            for label, f in (("direct", direct), ("gateway", gateway)):
                ttft = [_percentile(f.ttft, q) * 1e3 for q in (0.5, 0.95)]
                gaps = [_percentile(f.gaps, q) * 1e3 for q in (0.5, 0.95)]
                print(
                    f"c={concurrency:<2} {label:>7} {ttft[0]:7.1f}ms {ttft[1]:5.1f}ms "
                    f"{gaps[0]:12.2f}ms {gaps[1]:5.2f}ms {statistics.mean(f.rates):9.1f}",
                    flush=True,
                )
            ratio = _percentile(gateway.gaps, 0.5) / _percentile(direct.gaps, 0.5)
            extra = (_percentile(gateway.ttft, 0.5) - _percentile(direct.ttft, 0.5)) * 1e3
            print(
                f"c={concurrency:<2} gateway/direct per token p50 {ratio:.3f}, "
                f"TTFT p50 {extra:+.1f} ms",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per concurrency and path")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per generation")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="servers and gateway in this process (the gateway's own cost)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.in_process:
        print(
            f"in-process swarm of 2 servers + gateway; {args.rounds} rounds x {args.tokens} "
            "tokens per concurrency",
            flush=True,
        )
        trio.run(run_in_process, args.rounds, args.tokens)
        return
    model = str(demo_model_path())
    with tempfile.TemporaryDirectory() as home, ProcessGroup(env={"HOME": home}) as group:
        _, dht = group.start_dht()
        started = time.perf_counter()
        servers = [
            group.start(
                f"server{i}",
                swarm_command("serve", model, "--layers", layers, "--initial-peers", dht),
            )
            for i, layers in enumerate(("0:3", "3:6"))
        ]
        for server in servers:
            server.wait_for_line(r"ready: peer", 120)
        gateway = group.start(
            "api",
            swarm_command(
                "api",
                model,
                "--initial-peers",
                dht,
                "--port",
                "0",
                "--max-concurrent",
                "16",
                "--canary-interval",
                "0",
                "--reputation",
                str(Path(home) / "rep.json"),
            ),
        )
        url = gateway.wait_for_line(r"ready: swarm api at (\S+) ", 120).group(1)
        print(
            f"swarm of 2 servers + gateway ready in {time.perf_counter() - started:.1f} s; "
            f"{args.rounds} rounds x {args.tokens} tokens per concurrency",
            flush=True,
        )
        trio.run(run, dht, url, "swarm-demo", args.rounds, args.tokens)


if __name__ == "__main__":
    main()
