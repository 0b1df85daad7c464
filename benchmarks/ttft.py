"""Time to first token of the default model: an in-process 3-hop swarm against the same
model in one process, with the same int4 weights and in float32 (issue 21 item 5).

    python benchmarks/ttft.py [--rounds 7] [--speculative off]

SmolLM2-135M-Instruct (its GGUF, served as the file is: int4) on 0:10 / 10:20 / 20:30,
loopback, after the servers settle (they measure their capacity once online); each round
generates 2 tokens of a 43-token chat prompt through the swarm (printing how long opening
the chain and the prompt's step took) and then in one process twice (`LocalModel`, float32,
and the same with the int4 span). Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
import trio

from swarm.client.chain.chain import Chain
from swarm.client.config import ClientConfig, RecordsConfig
from swarm.client.model import AsyncRemoteModel
from swarm.lab.reference import LocalModel
from swarm.shards import load_chat_template, load_span
from swarm.shards.bundled import default_model_path
from swarm.testing.swarm import open_local_swarm
from swarm.types import LayerRange

QUESTION = "What is the capital of France, and why is it famous?"
marks: list[tuple[str, float]] = []


def _instrument() -> None:
    step, open_chain = Chain.step, AsyncRemoteModel.open_chain

    async def timed_step(self: Chain, *args: Any, **kwargs: Any) -> Any:
        began = time.perf_counter()
        out = await step(self, *args, **kwargs)
        marks.append(("step", time.perf_counter() - began))
        return out

    @asynccontextmanager
    async def timed_open(self: AsyncRemoteModel, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        began = time.perf_counter()
        async with open_chain(self, *args, **kwargs) as checked:
            marks.append(("open", time.perf_counter() - began))
            yield checked

    Chain.step = timed_step  # type: ignore[method-assign]
    AsyncRemoteModel.open_chain = timed_open  # type: ignore[method-assign,assignment]


async def run(rounds: int, speculative: str) -> None:
    path = default_model_path()
    template = load_chat_template(path)
    assert template is not None
    ranges = [LayerRange(0, 10), LayerRange(10, 20), LayerRange(20, 30)]
    float32 = LocalModel(path)
    int4 = LocalModel(path)
    int4.span = load_span(path, LayerRange(0, 30), quant=None)
    figures: dict[str, list[float]] = {"swarm": [], "float32": [], "int4": []}
    with tempfile.TemporaryDirectory() as tmp:
        records = RecordsConfig(
            reputation_path=str(Path(tmp) / "r.json"), evidence_dir=str(Path(tmp) / "e")
        )
        async with open_local_swarm(path, ranges) as local:
            config = ClientConfig(initial_peers=(local.dht_address,), records=records)
            async with AsyncRemoteModel.open(path, config) as model:
                assert model.tokenizer is not None
                text = template.render([{"role": "user", "content": QUESTION}])
                ids = list(model.tokenizer.encode(text, add_special_tokens=False).ids)
                await trio.sleep(20)  # the servers measure their capacity once online
                for _ in range(rounds):
                    marks.clear()
                    result = await model.generate_detailed(ids, 2, speculative=speculative)
                    figures["swarm"].append(result.ttft)
                    figures["float32"].append(float32.generate(ids, 2).timings[0])
                    figures["int4"].append(int4.generate(ids, 2).timings[0])
                    seen = ", ".join(f"{n} {s * 1e3:.0f} ms" for n, s in marks)
                    print(f"swarm {result.ttft * 1e3:.0f} ms ({seen}); one process float32 "
                          f"{figures['float32'][-1] * 1e3:.0f} ms, int4 "
                          f"{figures['int4'][-1] * 1e3:.0f} ms", flush=True)  # fmt: skip
    print(f"prompt {len(ids)} tokens; TTFT medians of {rounds}: " + ", ".join(
        f"{k} {statistics.median(v) * 1e3:.0f} ms" for k, v in figures.items()))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--speculative", default="off")
    args = parser.parse_args()
    torch.set_num_threads(1)
    _instrument()
    trio.run(run, args.rounds, args.speculative)


if __name__ == "__main__":
    main()
