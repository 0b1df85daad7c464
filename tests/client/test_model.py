"""AsyncRemoteModel and RemoteModel against fake in-process servers."""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import trio

from swarm.client.config import ClientConfig
from swarm.client.discovery import StaticDirectory
from swarm.client.model import AsyncRemoteModel
from swarm.client.remote import RemoteModel
from swarm.client.sampling import SamplingConfig
from swarm.errors import ConfigError
from swarm.shards import KVCache, load_head, load_span
from swarm.testing.checkpoints import write_random_llama
from swarm.types import LayerRange

from .fake_server import FakeServer, run_servers
from .pipeline import make_servers

DEMO_TOKENIZER = Path(__file__).parents[2] / "swarm/assets/models/swarm-demo/tokenizer.json"
LAYERS = 6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_random_llama(
        tmp_path_factory.mktemp("ckpt") / "tiny", num_layers=LAYERS, vocab=6144, std=0.1
    )
    if DEMO_TOKENIZER.exists():
        shutil.copy(DEMO_TOKENIZER, path / "tokenizer.json")
    return path


def _greedy_reference(path: Path, ids: list[int], n: int) -> list[int]:
    head, span = load_head(path), load_span(path, LayerRange(0, LAYERS))
    cache = KVCache.allocate(span.config, span.layers, 1, len(ids) + n)
    out, new, pos = [], torch.tensor([ids]), 0
    with torch.inference_mode():
        for _ in range(n):
            k = new.shape[1]
            h = span(head.embed(new), torch.arange(pos, pos + k).unsqueeze(0), cache)
            token = int(head.logits(h[:, -1:])[0, -1].argmax())
            out.append(token)
            pos += k
            new = torch.tensor([[token]])
            if token == 2:
                break
    return out


def _directory(servers: list[FakeServer]) -> StaticDirectory:
    return StaticDirectory([s.view() for s in servers])


async def test_async_generate_ids_equal_one_process(checkpoint: Path) -> None:
    prompt = [5, 17, 300, 42]
    want = _greedy_reference(checkpoint, prompt, 8)
    servers = make_servers(checkpoint, [(0, 3), (3, 6)])
    async with run_servers(servers):
        async with AsyncRemoteModel.open(
            checkpoint, ClientConfig(), directory=_directory(servers)
        ) as model:
            with trio.fail_after(30):
                result = await model.generate_detailed(prompt, max_new_tokens=8)
                ids = await model.generate(prompt, max_new_tokens=8)
    assert result.ids == want
    assert ids == want
    assert [(r["start"], r["stop"]) for r in result.route] == [(0, 3), (3, 6)]
    assert len(result.timings) == len(want)
    assert result.ttft == result.timings[0]


async def test_bad_prompts_are_config_errors(checkpoint: Path) -> None:
    async with AsyncRemoteModel.open(
        checkpoint, ClientConfig(), directory=StaticDirectory([])
    ) as model:
        with pytest.raises(ConfigError, match="empty"):
            await model.generate([], 4)
        with pytest.raises(ConfigError, match="token ids"):
            await model.generate([10**6], 4)
        with pytest.raises(ConfigError, match="max_new_tokens"):
            await model.generate([1], 0)


@pytest.fixture
def served(checkpoint: Path) -> Iterator[list[FakeServer]]:
    """Fake servers running in their own trio thread for the sync tests."""
    servers = make_servers(checkpoint, [(0, 6)])
    started, stop = threading.Event(), threading.Event()

    async def main() -> None:
        async with run_servers(servers):
            started.set()
            while not stop.is_set():
                await trio.sleep(0.05)

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    assert started.wait(30)
    yield servers
    stop.set()
    thread.join(10)


def test_sync_model_from_a_thread_and_inside_asyncio(
    checkpoint: Path, served: list[FakeServer]
) -> None:
    prompt = [5, 17, 300]
    want = _greedy_reference(checkpoint, prompt, 6)
    with RemoteModel(checkpoint, ClientConfig(), directory=_directory(served)) as model:
        assert model.generate(prompt, max_new_tokens=6) == want
        got: list[object] = []
        worker = threading.Thread(target=lambda: got.append(model.generate(prompt, 6)))
        worker.start()
        worker.join(30)
        assert got == [want]

        async def in_asyncio() -> object:
            return model.generate(prompt, max_new_tokens=6)

        assert asyncio.run(in_asyncio()) == want
        assert list(model.stream(prompt, max_new_tokens=6)) == want
        sampled = model.generate(prompt, 6, temperature=1.0, top_k=50, seed=3)
        assert model.generate(prompt, 6, temperature=1.0, top_k=50, seed=3) == sampled
        pieces = model.stream(prompt, max_new_tokens=6)
        assert next(pieces) == want[0]
        pieces.close()  # leaving early cancels the generation; the model keeps working
        assert model.generate(prompt, max_new_tokens=2) == want[:2]


@pytest.mark.skipif(not DEMO_TOKENIZER.exists(), reason="demo tokenizer not present")
def test_text_and_stop_strings(checkpoint: Path, served: list[FakeServer]) -> None:
    with RemoteModel(checkpoint, ClientConfig(), directory=_directory(served)) as model:
        text = model.generate("Hello there", max_new_tokens=12)
        assert isinstance(text, str)
        assert "".join(str(p) for p in model.stream("Hello there", max_new_tokens=12)) == text
        if len(text) >= 3:
            stop = text[1:3]
            cut = model.generate("Hello there", max_new_tokens=12, stop=[stop])
            assert cut == text[: text.find(stop)]
    with pytest.raises(ConfigError):
        SamplingConfig(temperature=-1)
