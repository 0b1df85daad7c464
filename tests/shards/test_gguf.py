"""GGUF files as they are: our spans against transformers on the same file, only the served
layers dequantized, config and tokenizer from the metadata, clear refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import swarm.shards.gguf as gguf_module
from swarm.errors import ShardError
from swarm.shards import ModelConfig, load_head, load_span, load_tokenizer, model_id
from swarm.shards.gguf import read_gguf_tensors, unpermute_rows
from swarm.testing.checkpoints import write_random_gguf
from swarm.types import LayerRange

# name -> write_random_gguf keyword arguments; every variant has grouped-query attention
# except "f16-mha-tied", and the quantized ones cover both embedding layouts.
VARIANTS: dict[str, dict[str, object]] = {
    "f32": {"qtype": "F32"},
    "f16-mha-tied": {"qtype": "F16", "kv_heads": 4, "tie_word_embeddings": True},
    "bf16": {"qtype": "BF16", "kv_heads": 1},
    "q8_0": {"qtype": "Q8_0"},
    "q4_0-tied": {"qtype": "Q4_0", "tie_word_embeddings": True},
    "q4_1": {"qtype": "Q4_1"},
    "q4_1-tied": {"qtype": "Q4_1", "tie_word_embeddings": True, "kv_heads": 1},
}
LAYERS = 4


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder holding every variant as ``<name>.gguf`` (transformers loads by file name)."""
    root = tmp_path_factory.mktemp("gguf")
    for seed, (name, kwargs) in enumerate(VARIANTS.items()):
        write_random_gguf(root / f"{name}.gguf", seed=seed, **kwargs)  # type: ignore[arg-type]
    return root


@pytest.fixture(scope="module")
def references(gguf_dir: Path) -> dict[str, torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    return {
        name: AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=f"{name}.gguf", dtype=torch.float32
        ).eval()
        for name in VARIANTS
    }


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers(
    name: str, gguf_dir: Path, references: dict[str, torch.nn.Module]
) -> None:
    path = gguf_dir / f"{name}.gguf"
    config = ModelConfig.from_pretrained(path)
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(24).expand(2, 24)  # (2, 24)
    head = load_head(path)
    first, second = load_span(path, LayerRange(0, 1)), load_span(path, LayerRange(1, LAYERS))
    with torch.inference_mode():
        ours = head.logits(second(first(head.embed(ids), positions), positions))
        theirs = references[name](ids).logits  # (2, 24, vocab)
    assert ours.shape == theirs.shape == (2, 24, config.vocab_size)
    # Both dequantize the same blocks to float32: the tolerance is float32 rounding, far
    # below the quantization error (~1e-1 on these logits for Q4).
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_serving_dtype_bfloat16(gguf_dir: Path, references: dict[str, torch.nn.Module]) -> None:
    path = gguf_dir / "q8_0.gguf"
    ids = torch.randint(0, 200, (1, 16), generator=torch.Generator().manual_seed(4))
    head, span = load_head(path), load_span(path, LayerRange(0, LAYERS), dtype=torch.bfloat16)
    assert span.dtype == torch.bfloat16
    with torch.inference_mode():
        hidden = span(head.embed(ids).to(torch.bfloat16), torch.arange(16)[None])
        ours = head.logits(hidden.float())
        theirs = references["q8_0"](ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0.05, atol=0.15)  # bfloat16 activations


def test_config_from_metadata(gguf_dir: Path) -> None:
    untied = ModelConfig.from_pretrained(gguf_dir / "q4_1.gguf")
    assert untied.architecture == "LlamaForCausalLM"
    assert (untied.num_hidden_layers, untied.hidden_size, untied.intermediate_size) == (4, 64, 128)
    assert (untied.num_attention_heads, untied.num_key_value_heads, untied.head_dim) == (4, 2, 16)
    assert untied.vocab_size == 269 and untied.eos_token_id == (2,) and untied.bos_token_id == 1
    assert not untied.tie_word_embeddings and untied.max_position_embeddings == 512
    assert untied.torch_dtype == "float32"
    assert ModelConfig.from_pretrained(gguf_dir / "q4_1-tied.gguf").tie_word_embeddings
    assert ModelConfig.from_pretrained(gguf_dir / "f16-mha-tied.gguf").torch_dtype == "float16"


@pytest.fixture
def dequantized(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of every tensor whose bytes the GGUF reader reads (the only path to tensor data)."""
    names: list[str] = []
    real = gguf_module.tensor_bytes

    def spy(path: object, tensor: object) -> object:
        names.append(tensor.name)  # type: ignore[attr-defined]
        return real(path, tensor)  # type: ignore[arg-type]

    monkeypatch.setattr(gguf_module, "tensor_bytes", spy)
    return names


def test_span_reads_only_its_layers(gguf_dir: Path, dequantized: list[str]) -> None:
    load_span(gguf_dir / "q4_1.gguf", LayerRange(1, 3))
    assert len(dequantized) == 2 * 9  # 7 matrices + 2 norms per layer
    assert {n.split(".")[1] for n in dequantized} == {"1", "2"}
    assert all(n.startswith("blk.") for n in dequantized)


def test_head_reads_only_its_tensors(gguf_dir: Path, dequantized: list[str]) -> None:
    load_head(gguf_dir / "q4_1.gguf")
    assert sorted(dequantized) == ["output.weight", "output_norm.weight", "token_embd.weight"]
    dequantized.clear()
    tied = load_head(gguf_dir / "q4_1-tied.gguf")
    assert sorted(dequantized) == ["output_norm.weight", "token_embd.weight"]
    assert tied.lm_head.weight is tied.embeddings.weight


def test_model_id_follows_the_bytes(gguf_dir: Path, tmp_path: Path, dequantized: list[str]) -> None:
    mid = model_id(gguf_dir / "q4_1.gguf")
    assert mid.startswith("llama-") and len(mid.rsplit("-", 1)[1]) == 12
    copy = tmp_path / "renamed copy.gguf"
    shutil.copyfile(gguf_dir / "q4_1.gguf", copy)
    assert model_id(copy) == mid
    other = write_random_gguf(tmp_path / "q4_1.gguf", qtype="Q4_1", seed=99)
    assert model_id(other) != mid
    assert model_id(gguf_dir / "q8_0.gguf") != mid
    assert dequantized == []  # headers and byte samples only


def test_tokenizer_matches_transformers(gguf_dir: Path) -> None:
    from transformers import AutoTokenizer

    ours = load_tokenizer(gguf_dir / "f32.gguf")
    assert ours is not None
    theirs = AutoTokenizer.from_pretrained(gguf_dir, gguf_file="f32.gguf")
    for text in [
        "the cat sat on the mat",
        "<|im_start|>user\nhi there<|im_end|>\n",
        "  two  spaces, tabs\t\tand naïve 東京 🐍",
    ]:
        ids = ours.encode(text).ids
        assert ids == theirs(text).input_ids
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(
            ids, skip_special_tokens=True
        )
    assert ours.token_to_id("<|im_end|>") == 2


def test_unpermute_inverts_llama_cpp_order() -> None:
    w = torch.arange(4 * 6 * 3, dtype=torch.float32).reshape(4 * 6, 3)  # 4 heads, head_dim 6
    gguf_order = w.reshape(4, 2, 3, 3).transpose(1, 2).reshape(24, 3)  # llama.cpp's permute
    assert not torch.equal(gguf_order, w)
    assert torch.equal(unpermute_rows(gguf_order, 4), w)


def _rewrite(path: Path, *, arch: str = "llama", extra: dict[str, int] | None = None) -> Path:
    """A copy of a tiny GGUF with another architecture name or extra integer keys."""
    import gguf

    reader = gguf.GGUFReader(path)
    out = path.with_name(f"{path.stem}-{arch}.gguf")
    writer = gguf.GGUFWriter(str(out), arch)
    for key, value in (extra or {}).items():
        writer.add_uint32(key, value)
    writer.add_block_count(1)
    for tensor in reader.tensors[:2]:
        writer.add_tensor(tensor.name, tensor.data.copy(), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def test_non_llama_and_multi_part_are_refused(gguf_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "tiny.gguf"
    shutil.copyfile(gguf_dir / "f32.gguf", source)
    with pytest.raises(ShardError, match=r"GGUF architecture 'gpt2' is not supported"):
        load_span(_rewrite(source, arch="gpt2"), LayerRange(0, 1))
    parted = _rewrite(source, extra={"split.count": 3, "split.no": 0})
    with pytest.raises(ShardError, match=r"multi-part GGUF \(split.count=3\) is not supported"):
        ModelConfig.from_pretrained(parted)
    with pytest.raises(ShardError, match=r"GGUF architecture 'gpt2'"):
        model_id(_rewrite(source, arch="gpt2"))


def test_missing_layers_and_folder_hint(gguf_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ShardError, match=r"layer range 2:9 is outside the model: it has 4"):
        load_span(gguf_dir / "f32.gguf", LayerRange(2, 9))
    with pytest.raises(ShardError, match=r"no config\.json in the model folder; to serve a GGUF"):
        ModelConfig.from_pretrained(gguf_dir)


def _llama_cpp_rope_factors(head_dim: int, theta: float, scaling: dict[str, float]) -> torch.Tensor:
    """rope_freqs.weight as llama.cpp's convert_hf_to_gguf.py computes it for llama3 scaling."""
    import math

    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    old = scaling["original_max_position_embeddings"]
    low, high, factor = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["factor"]
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def test_llama31_rope_freqs_equal_transformers_on_the_original(tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from swarm.testing.checkpoints import make_tiny_checkpoint, write_gguf

    theta = 10000.0  # with head_dim 16 and these bands, every band has frequencies in it
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    folder = make_tiny_checkpoint(tmp_path / "hf", rope_theta=theta, rope_scaling=scaling)
    factors = _llama_cpp_rope_factors(16, theta, scaling)  # type: ignore[arg-type]
    assert 1.0 in factors.tolist() and 8.0 in factors.tolist()
    assert len(set(factors.tolist())) > 2  # and smoothed ones in between
    path = write_gguf(
        tmp_path / "llama31.gguf",
        load_file(folder / "model.safetensors"),
        heads=4,
        kv_heads=2,
        rope_theta=theta,
        rope_freqs=factors,
        rms_norm_eps=1e-6,  # transformers' default
    )
    config = ModelConfig.from_pretrained(path)
    assert config.rope_scaling is not None and config.rope_scaling.rope_type == "factors"
    ids = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(5))
    head, span = load_head(path), load_span(path, LayerRange(0, LAYERS))
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        ours = head.logits(span(head.embed(ids), torch.arange(64)[None]))  # (1, 64, vocab)
        theirs = reference(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def _sentencepiece_gguf(path: Path, *, model: str = "llama", add_bos: bool | None = None) -> Path:
    """A metadata-only GGUF with a tiny SentencePiece vocabulary: bytes for fallback, pieces
    scored best-first, no merges (they are recovered from the scores)."""
    import gguf

    pieces = (
        "▁ t h e c a s o n m ▁t ▁th ▁the at ▁c ▁cat ▁s ▁sat on ▁on ▁m ▁mat he th ▁a an ▁an"
    ).split(" ")
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("sentencepiece test")
    writer.add_block_count(1)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_feed_forward_length(128)
    writer.add_context_length(128)
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))])
    writer.add_token_types([2, 3, 3, *([6] * 256), *([1] * len(pieces))])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("add_bos", [None, False])
def test_sentencepiece_tokenizer_matches_transformers(add_bos: bool | None, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    path = _sentencepiece_gguf(tmp_path / "sp.gguf", add_bos=add_bos)
    ours = load_tokenizer(path)
    assert ours is not None
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="sp.gguf")
    for text in ["the cat sat on the mat", " the  cat", "héllo\nworld 東京", "</s>the<s>", "  "]:
        ids = ours.encode(text).ids
        assert ids == theirs(text).input_ids
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(
            ids, skip_special_tokens=True
        )
    assert (ours.encode("the").ids[0] == 1) == (add_bos is None)  # BOS unless the file says no


def test_other_tokenizer_kinds_are_refused(tmp_path: Path) -> None:
    path = _sentencepiece_gguf(tmp_path / "t5.gguf", model="t5")
    with pytest.raises(ShardError, match=r"tokenizer.ggml.model='t5' is not supported"):
        load_tokenizer(path)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q5_K"])
def test_k_quants_dequantize_as_the_gguf_package_does(qtype: str, tmp_path: Path) -> None:
    """gguf's numpy code cannot quantize K-quants, so the blocks are random bytes (with sane
    float16 scales); what we read must equal gguf's own dequantization, in our layout."""
    import gguf
    import numpy as np

    kind = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[kind]
    rows, cols = 64, 256
    raw = np.random.default_rng(0).integers(0, 256, (rows, cols // block * size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    where = [size - 2] if qtype == "Q6_K" else [0, 2]  # the block's float16 scale(s)
    for offset in where:
        raw[:, offset::size][:, : cols // block] = scale[0]
        raw[:, offset + 1 :: size][:, : cols // block] = scale[1]
    path = tmp_path / f"{qtype}.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(256)
    writer.add_head_count(4)
    writer.add_feed_forward_length(64)
    writer.add_vocab_size(64)
    writer.add_tensor("blk.0.attn_q.weight", raw, raw_dtype=kind)
    writer.add_tensor("blk.0.ffn_down.weight", raw, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    expected = torch.from_numpy(gguf.quants.dequantize(raw, kind).copy())  # (64, 256)
    assert expected.shape == (rows, cols) and bool(torch.isfinite(expected).all())
    got = read_gguf_tensors(
        path,
        {"blk.0.attn_q.weight": (rows, cols), "blk.0.ffn_down.weight": (rows, cols)},
        lambda t: t,
    )
    torch.testing.assert_close(got["blk.0.ffn_down.weight"], expected, rtol=0, atol=0)
    torch.testing.assert_close(got["blk.0.attn_q.weight"], unpermute_rows(expected, 4))
