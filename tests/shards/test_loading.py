"""Loading: only the needed files and tensors, clear errors, model ids, our own writer."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import swarm.shards.checkpoint as checkpoint_module
from swarm.errors import ShardError
from swarm.shards import ModelConfig, load_head, load_span, model_id
from swarm.shards.checkpoint import tensor_index
from swarm.shards.fingerprint import parameter_count
from swarm.testing.checkpoints import write_random_llama
from swarm.types import LayerRange


@pytest.fixture
def spy_opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the file name of every ``safe_open`` the loader makes."""
    opened: list[str] = []
    real = checkpoint_module.safe_open

    def spy(filename: str, *args: object, **kwargs: object) -> object:
        opened.append(Path(filename).name)
        return real(filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "safe_open", spy)
    return opened


def test_sharded_span_opens_only_its_files(
    checkpoints: dict[str, Path],
    reference_models: dict[str, torch.nn.Module],
    spy_opens: list[str],
) -> None:
    path = checkpoints["llama-sharded"]
    weight_map: dict[str, str] = json.loads((path / "model.safetensors.index.json").read_text())[
        "weight_map"
    ]
    all_files = set(weight_map.values())
    expected = {file for name, file in weight_map.items() if name.startswith("model.layers.2.")}
    assert len(all_files) >= 3 and len(expected) < len(all_files)

    span = load_span(path, LayerRange(2, 3))
    assert set(spy_opens) == expected
    assert len(spy_opens) == len(expected)  # each file once
    layer = reference_models["llama-sharded"].model.layers[2]  # type: ignore[union-attr, index]
    torch.testing.assert_close(span.blocks[0].attn.k.weight, layer.self_attn.k_proj.weight)
    torch.testing.assert_close(span.blocks[0].mlp.down.weight, layer.mlp.down_proj.weight)


def test_head_reads_no_layer_tensors(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    requested: list[str] = []
    real = checkpoint_module.read_tensors

    def spy(path: Path, wanted: dict[str, tuple[int, ...]], convert: object) -> object:
        requested.extend(wanted)
        return real(path, wanted, convert)  # type: ignore[arg-type]

    monkeypatch.setattr("swarm.shards.head.read_tensors", spy)
    load_head(checkpoints["llama"])
    assert sorted(requested) == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
    requested.clear()
    tied = load_head(checkpoints["llama-mha-tied"])
    assert sorted(requested) == ["model.embed_tokens.weight", "model.norm.weight"]
    assert tied.lm_head.weight is tied.embeddings.weight


def test_span_reads_only_its_layers(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    requested: list[str] = []
    real = checkpoint_module.read_tensors

    def spy(path: Path, wanted: dict[str, tuple[int, ...]], convert: object) -> object:
        requested.extend(wanted)
        return real(path, wanted, convert)  # type: ignore[arg-type]

    monkeypatch.setattr("swarm.shards.span.read_tensors", spy)
    load_span(checkpoints["llama"], LayerRange(1, 3))
    assert requested and all(
        n.startswith(("model.layers.1.", "model.layers.2.")) for n in requested
    )
    assert len(requested) == 2 * 9  # 7 matrices + 2 norms per layer


@pytest.fixture
def writable(tmp_path: Path) -> Path:
    return write_random_llama(tmp_path / "tiny", num_layers=3, vocab=64, seed=1)


def test_missing_files(writable: Path, tmp_path: Path) -> None:
    (writable / "model.safetensors").unlink()
    with pytest.raises(
        ShardError, match=r"neither model\.safetensors nor model\.safetensors\.index\.json"
    ):
        load_span(writable, LayerRange(0, 1))
    with pytest.raises(ShardError, match=r"no config\.json"):
        load_span(tmp_path / "nowhere", LayerRange(0, 1))


def test_missing_shard_named_by_index(tmp_path: Path) -> None:
    path = write_random_llama(tmp_path / "sharded", num_layers=4, vocab=64, layers_per_file=2)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        ShardError, match=r"names model-00002-of-00002\.safetensors, which is missing"
    ):
        load_span(path, LayerRange(0, 1))


def test_missing_tensor(writable: Path) -> None:
    file = writable / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, file)
    load_span(writable, LayerRange(0, 1))  # other layers still load
    with pytest.raises(ShardError, match=r"no tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_span(writable, LayerRange(1, 2))


def test_wrong_tensor_shape(writable: Path) -> None:
    file = writable / "model.safetensors"
    tensors = load_file(file)
    tensors["model.layers.2.self_attn.k_proj.weight"] = torch.zeros(7, 64)
    save_file(tensors, file)
    with pytest.raises(
        ShardError,
        match=r"'model\.layers\.2\.self_attn\.k_proj\.weight' has shape "
        r"\[7, 64\], expected \[32, 64\]",
    ):
        load_span(writable, LayerRange(1, 3))


@pytest.mark.parametrize("stop", [4, 10])
def test_range_outside_the_model(writable: Path, stop: int) -> None:
    with pytest.raises(
        ShardError, match=rf"layer range 2:{stop} is outside the model: it has 3 layers"
    ):
        load_span(writable, LayerRange(2, stop))


def test_unknown_architecture(writable: Path) -> None:
    config = json.loads((writable / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (writable / "config.json").write_text(json.dumps(config))
    with pytest.raises(ShardError, match="architectures='GPT2LMHeadModel' is not supported"):
        load_span(writable, LayerRange(0, 1))
    with pytest.raises(ShardError, match="GPT2LMHeadModel"):
        load_head(writable)


def test_model_id(checkpoints: dict[str, Path], writable: Path, tmp_path: Path) -> None:
    mid = model_id(writable)
    arch, size, digest = mid.split("-")
    stored = sum(math.prod(shape) for _, shape in tensor_index(writable).values())
    assert parameter_count(ModelConfig.from_pretrained(writable)) == stored
    assert (arch, size) == ("llama", f"{round(stored / 1e3)}k")
    assert len(digest) == 12 and "/" not in mid
    assert model_id(writable) == mid
    # the same bytes in another folder, whatever its name: the same id
    copy = tmp_path / "my model (copy)"
    shutil.copytree(writable, copy)
    assert model_id(copy) == mid
    # other weights under the same folder name: another id
    other = write_random_llama(tmp_path / "other" / "tiny", num_layers=3, vocab=64, seed=2)
    assert model_id(other) != mid
    assert model_id(checkpoints["llama"]).startswith("llama-")
    assert model_id(checkpoints["qwen2"]).startswith("qwen2-")


def test_model_id_sees_changed_weights_of_the_same_shape(writable: Path, tmp_path: Path) -> None:
    mid = model_id(writable)
    file = writable / "model.safetensors"
    tensors = load_file(file)
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"] * 2
    save_file(tensors, file)
    assert model_id(writable) != mid


def test_model_id_does_not_depend_on_sharding(tmp_path: Path) -> None:
    single = write_random_llama(tmp_path / "single", num_layers=4, vocab=64, seed=5)
    sharded = write_random_llama(
        tmp_path / "sharded", num_layers=4, vocab=64, seed=5, layers_per_file=2
    )
    assert model_id(single) == model_id(sharded)


def test_model_id_reads_headers_not_tensors(
    checkpoints: dict[str, Path], spy_opens: list[str]
) -> None:
    model_id(checkpoints["llama-sharded"])
    assert spy_opens == []


def test_our_writer_matches_transformers(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    path = write_random_llama(tmp_path / "ours", num_layers=2, vocab=64, layers_per_file=1)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    head, span = load_head(path), load_span(path, LayerRange(0, 2))
    ids = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = head.logits(span(head.embed(ids), torch.arange(10)[None]))
        torch.testing.assert_close(ours, ref(ids).logits, rtol=1e-4, atol=1e-5)


LOAD_AND_LIST = """
import sys
from swarm.shards import load_head, load_span
from swarm.shards.quant import Quantization
from swarm.types import LayerRange
path = sys.argv[1]
load_span(path, LayerRange(0, 2))
load_span(path, LayerRange(0, 2), quant=Quantization.INT8)
load_head(path)
print(sorted(m for m in sys.modules if m.startswith("torch._dynamo")))
"""


@pytest.mark.slow  # a fresh process: what a server start or a client open imports
def test_loading_imports_no_compiler(tmp_path: Path) -> None:
    """Building a span or a head on the meta device ran PyTorch reference ops (a division,
    a normal_ init) whose first use imports torch._dynamo: seconds of every `swarm serve`
    start and client open (1.8 s of a tiny model's open)."""
    import subprocess
    import sys

    path = write_random_llama(tmp_path / "m", num_layers=2, vocab=64)
    done = subprocess.run(
        [sys.executable, "-c", LOAD_AND_LIST, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_span_dtype_and_device_are_its_first_parameters(
    checkpoints: dict[str, Path], dtype: torch.dtype
) -> None:
    """`Span.dtype`/`device` read the first block's norm weight instead of walking the
    module tree: the same answer as the walk, after a cast of the whole span too."""
    span = load_span(checkpoints["llama"], LayerRange(1, 3), dtype=dtype)
    first = next(iter(span.parameters()))
    assert first is span.blocks[0].attn_norm.weight  # type: ignore[union-attr]
    assert (span.dtype, span.device) == (first.dtype, first.device) == (dtype, torch.device("cpu"))
    span.to(torch.float16)
    assert span.dtype == next(iter(span.parameters())).dtype == torch.float16
    assert span.narrow(LayerRange(2, 3)).dtype == torch.float16
