"""Embed the swarm client in an application.

    python examples/embed_client.py MODEL_DIR HOST:PORT

MODEL_DIR is the same checkpoint folder the servers load (the client runs only the
embeddings, final norm and lm_head locally); HOST:PORT is any DHT node of the swarm.
"""

from __future__ import annotations

import sys

import trio

from swarm.client import AsyncRemoteModel, ClientConfig, RemoteModel, SamplingConfig


def sync_example(model_dir: str, peer: str) -> None:
    # Blocking API: usable from any thread, also from inside an asyncio program.
    with RemoteModel.from_pretrained(model_dir, initial_peers=[peer], step_timeout=10) as model:
        print(model.generate("The Python interpreter", max_new_tokens=20))
        for piece in model.stream("def fibonacci(n):", max_new_tokens=30, stop=["\n\n"]):
            print(piece, end="", flush=True)
        print()


async def trio_example(model_dir: str, peer: str) -> None:
    # trio-native API: sessions, routes and timings are available on the result.
    config = ClientConfig(initial_peers=(peer,))
    async with AsyncRemoteModel.open(model_dir, config) as model:
        result = await model.generate_detailed(
            "import os", max_new_tokens=16, sampling=SamplingConfig(temperature=0.7, seed=1)
        )
        print(result.text, result.route, f"ttft {result.ttft:.3f} s")


if __name__ == "__main__":
    sync_example(sys.argv[1], sys.argv[2])
    trio.run(trio_example, sys.argv[1], sys.argv[2])
