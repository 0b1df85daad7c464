"""A GGUF file served as it is by an in-process swarm: each server dequantizes only its own
layers, the client only the head, and the swarm's greedy tokens equal one process's."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import trio

import swarm.shards.gguf as gguf_module
from swarm.client.config import ClientConfig, RecordsConfig
from swarm.client.model import AsyncRemoteModel
from swarm.lab.reference import generate_locally
from swarm.shards import load_chat_template, model_id
from swarm.testing.checkpoints import write_random_gguf
from swarm.testing.swarm import open_local_swarm
from swarm.types import LayerRange

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf-swarm") / "tiny-q8.gguf"
    return write_random_gguf(path, qtype="Q8_0", num_layers=4, seed=7)


async def test_swarm_serves_a_gguf_file(
    gguf_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    read: list[str] = []
    real = gguf_module.tensor_bytes

    def spy(path: object, tensor: object) -> object:
        read.append(tensor.name)  # type: ignore[attr-defined]
        return real(path, tensor)  # type: ignore[arg-type]

    monkeypatch.setattr(gguf_module, "tensor_bytes", spy)
    template = load_chat_template(gguf_model)
    assert template is not None
    prompt = template.render([{"role": "user", "content": "the cat sat"}])
    with trio.fail_after(120):
        async with open_local_swarm(gguf_model, [LayerRange(0, 2), LayerRange(2, 4)]) as local:
            assert {s.ready.layers for s in local.servers} == {LayerRange(0, 2), LayerRange(2, 4)}
            layers_read = Counter(name.split(".")[1] for name in read if name.startswith("blk."))
            assert layers_read == {str(i): 9 for i in range(4)}  # each layer by one server, once
            read.clear()
            client = ClientConfig(
                initial_peers=(local.dht_address,),
                records=RecordsConfig(
                    reputation_path=str(tmp_path / "reputation.json"),
                    evidence_dir=str(tmp_path / "evidence"),
                ),
            )
            async with AsyncRemoteModel.open(gguf_model, client) as remote:
                assert sorted(read) == ["output.weight", "output_norm.weight", "token_embd.weight"]
                assert remote.tokenizer is not None
                ids = list(remote.tokenizer.encode(prompt, add_special_tokens=False).ids)
                result = await remote.generate_detailed(ids, NEW_TOKENS)
    expected = generate_locally(gguf_model, ids, NEW_TOKENS).ids
    eos = expected.index(2) + 1 if 2 in expected else len(expected)
    assert result.ids == expected[:eos]
    assert model_id(gguf_model).startswith("llama-")
