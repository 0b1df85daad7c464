"""Speculative decoding over distance (issue 21): the real model on 3 servers, every link
delayed, plain decoding against guessed tokens.

    python benchmarks/wan.py                           # 0, 10, 25, 50, 100 ms per link
    python benchmarks/wan.py --delays 0,25 --tokens 48 --oracle

SmolLM2-135M-Instruct (the default model's GGUF) on an in-process swarm of 3 servers (0:10,
10:20, 20:30) behind `swarm.testing.links`: D ms one way on every link, both directions
(client to each server, server to server), so one round trip of the chain costs 4·D. For
each D and each task (``repeat``: rewrite a given paragraph, which copies much of its input;
``chat``: an open question), greedy, the same rendered chat prompt through:

- ``plain``: no guesses (``--speculative off``);
- ``ngram``: prompt lookup, k chosen each round (``auto``);
- ``draft``: a draft model, here the target's own first 8 layers under its head (an
  early-exit self-drafter; this repository ships no smaller model with SmolLM2's tokenizer);
- with ``--oracle``: a drafter that guesses the plain answer's next token right with
  probability 0.5 / 0.7 / 0.9 (the model of the gain at a given acceptance).

Prints per-token latency (p50 / p95 of the rounds' per-token shares), time to first token,
acceptance, tokens per round trip, and whether the tokens equal plain decoding's (they must).
Not a test: nothing here asserts timings. One torch thread per server.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import trio

from swarm.client.config import ClientConfig, SpeculationConfig
from swarm.client.model import AsyncRemoteModel
from swarm.client.speculation import DraftModel, ModelDrafter, SpeculationPlanner, Speculator
from swarm.shards import load_chat_template
from swarm.shards.bundled import default_model_path
from swarm.testing.drafters import OracleDrafter
from swarm.testing.links import LinkEmulator, LinkSpec
from swarm.testing.swarm import open_local_swarm
from swarm.types import LayerRange

RANGES = [LayerRange(0, 10), LayerRange(10, 20), LayerRange(20, 30)]
PARAGRAPH = (
    "The swarm runs a language model across many computers. Each computer serves a few "
    "layers, and a client sends the hidden states from one computer to the next. The client "
    "checks the answers of the computers by asking a second computer to repeat some steps."
)
TASKS = {
    "repeat": f"Rewrite this paragraph, keeping every sentence:\n\n{PARAGRAPH}",
    "chat": "What are three good reasons to learn to cook at home?",
}


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _one(
    model: AsyncRemoteModel, prompt: list[int], tokens: int, speculative: str | Speculator
) -> tuple[list[int], dict[str, float]]:
    started = time.perf_counter()
    result = await model.generate_detailed(prompt, tokens, speculative=speculative)
    wall = time.perf_counter() - started
    rest = result.timings[1:] or result.timings
    stats = result.speculation
    figures = {
        "p50": statistics.median(rest),
        "p95": _quantile(rest, 0.95),
        "ttft": result.ttft,
        "per_token": (wall - result.ttft) / max(1, len(result.ids) - 1),
        "rounds": float(result.rounds),
        "tokens": float(len(result.ids)),
        "acceptance": stats.accepted / stats.drafted if stats and stats.drafted else 0.0,
    }
    return result.ids, figures


async def run(delays: list[float], tokens: int, oracle: bool) -> None:
    path = default_model_path()
    template = load_chat_template(path)
    assert template is not None
    draft = await trio.to_thread.run_sync(DraftModel.early_exit, path, 8)
    print(f"model {path.name}; draft: its first 8 of 30 layers; {tokens} new tokens, greedy")
    for delay in delays:
        async with (
            LinkEmulator(LinkSpec(delay=delay / 1e3)) as links,
            open_local_swarm(path, links=links) as local,
        ):
            for layers in RANGES:
                await local.add_server(layers)
            config = ClientConfig(
                initial_peers=(local.dht_address,), speculation=SpeculationConfig(mode="auto")
            )
            transport = links.transport("client")
            async with AsyncRemoteModel.open(path, config, transport=transport) as model:
                await model.generate_detailed([1, 2, 3], 2, speculative="off")  # warm up
                for task, text in TASKS.items():
                    message = [{"role": "user", "content": text}]
                    prompt = model.encode(template.render(message, add_generation_prompt=True))
                    plain, base = await _one(model, prompt, tokens, "off")
                    runs: dict[str, str | Speculator] = {
                        "ngram": "auto",
                        "draft": Speculator(ModelDrafter(draft), SpeculationPlanner()),
                    }
                    if oracle:
                        for a in (0.5, 0.7, 0.9):
                            drafter = OracleDrafter(plain, len(prompt), a, seed=1)
                            runs[f"oracle {a}"] = Speculator(drafter, SpeculationPlanner())
                    print(
                        f"[{delay:g} ms/link, {task}] plain: "
                        f"{base['per_token'] * 1e3:.1f} ms/token "
                        f"(p50 {base['p50'] * 1e3:.1f}, p95 {base['p95'] * 1e3:.1f}), "
                        f"ttft {base['ttft'] * 1e3:.0f} ms",
                        flush=True,
                    )
                    for name, speculative in runs.items():
                        ids, f = await _one(model, prompt, tokens, speculative)
                        print(
                            f"    {name}: {f['per_token'] * 1e3:.1f} ms/token "
                            f"({f['per_token'] / base['per_token']:.2f}x plain; p50 "
                            f"{f['p50'] * 1e3:.1f}, p95 {f['p95'] * 1e3:.1f}), ttft "
                            f"{f['ttft'] * 1e3:.0f} ms, acceptance {f['acceptance']:.2f}, "
                            f"{f['tokens'] / f['rounds']:.2f} tokens/round trip, "
                            f"same tokens: {ids == plain}",
                            flush=True,
                        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--delays", default="0,10,25,50,100", help="ms one way per link")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--oracle", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    delays = [float(d) for d in args.delays.split(",")]
    trio.run(run, delays, args.tokens, args.oracle)


if __name__ == "__main__":
    main()
