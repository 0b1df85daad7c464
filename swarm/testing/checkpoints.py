"""Tiny random checkpoints for tests, demos and benchmarks.

- :func:`write_random_llama` (from `swarm.lab.checkpoints`, which ``swarm selfcheck`` uses)
  writes a Hugging Face-format Llama folder with our own writer, without ``transformers``.
- :func:`write_random_gguf` writes a random Llama as a GGUF file with ``gguf.GGUFWriter``, the
  way llama.cpp's converter lays it out (GGUF names, Q/K rows reordered for GGML's RoPE,
  matrices in F32, F16, BF16, Q8_0, Q4_0 or Q4_1), with a tiny byte-level BPE vocabulary, its
  merges and a ChatML template in the metadata.
- :func:`make_tiny_checkpoint` builds a random model with ``transformers`` (Llama, Mistral or
  Qwen2) and saves it with ``save_pretrained(safe_serialization=True)``; it needs the test
  extra installed and is the numerical reference's own format.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from swarm.lab.checkpoints import layer_tensors, randn, write_random_llama

__all__ = [
    "GGUF_CHAT_TEMPLATE",
    "make_tiny_checkpoint",
    "write_gguf",
    "write_random_gguf",
    "write_random_llama",
]

_ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}


GGUF_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_GGUF_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_GGUF_MERGES = ("Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s", "r e", "a t")
_GGUF_TOP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
# our layer tensor names (Hugging Face, under "model.layers.{i}.") -> llama.cpp's (under "blk.{i}.")
_GGUF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def write_random_gguf(
    path: str | Path,
    *,
    qtype: str = "F32",
    num_layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    std: float = 0.1,
) -> Path:
    """Write a random Llama to the GGUF file ``path`` as llama.cpp's converter would (see
    :func:`write_gguf`), with a 269-token vocabulary. ``hidden`` and ``intermediate`` must be
    multiples of 32 for the block types. Returns the path.
    """
    vocab = len(_gguf_vocab()[0])
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": randn(gen, (vocab, hidden), std)
    }
    for i in range(num_layers):
        tensors.update(
            layer_tensors(gen, i, hidden, heads, kv_heads, intermediate, std, torch.float32)
        )
    tensors["model.norm.weight"] = 1 + randn(gen, (hidden,), 0.1)
    if not tie_word_embeddings:
        tensors["lm_head.weight"] = randn(gen, (vocab, hidden), std)
    return write_gguf(path, tensors, heads=heads, kv_heads=kv_heads, qtype=qtype)


def write_gguf(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    heads: int,
    kv_heads: int,
    qtype: str = "F32",
    rope_theta: float = 10000.0,
    rope_freqs: torch.Tensor | None = None,
    context_length: int = 512,
    rms_norm_eps: float = 1e-5,
) -> Path:
    """Write Hugging Face-named Llama ``tensors`` to the GGUF file ``path`` as llama.cpp's
    converter does: GGUF names, Q/K rows permuted for GGML's RoPE, 2-D weights in ``qtype``
    (``F32``, ``F16``, ``BF16``, ``Q8_0``, ``Q4_0``, ``Q4_1``), norms and ``rope_freqs`` (Llama
    3.1 frequency factors, ``(head_dim/2,)``) in F32, no ``output.weight`` without
    ``lm_head.weight``. The metadata holds a byte-level BPE vocabulary (the 256 byte symbols, a
    few merges, ChatML special tokens; cut or padded to the embeddings' rows) and
    :data:`GGUF_CHAT_TEMPLATE`. Returns the path.
    """
    import gguf
    import numpy as np

    vocab, hidden = tensors["model.embed_tokens.weight"].shape
    layers = 1 + max(int(n.split(".")[2]) for n in tensors if n.startswith("model.layers."))
    tokens, merges = _gguf_vocab()
    tokens = [*tokens, *(f"<pad{i}>" for i in range(vocab - len(tokens)))][:vocab]
    head_dim = tensors["model.layers.0.self_attn.q_proj.weight"].shape[0] // heads
    inner = tensors["model.layers.0.mlp.up_proj.weight"].shape[0]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny random llama")
    for add, value in [
        (writer.add_block_count, layers),
        (writer.add_context_length, context_length),
        (writer.add_embedding_length, hidden),
        (writer.add_feed_forward_length, inner),
        (writer.add_head_count, heads),
        (writer.add_head_count_kv, kv_heads),
        (writer.add_key_length, head_dim),
        (writer.add_value_length, head_dim),
        (writer.add_layer_norm_rms_eps, rms_norm_eps),
        (writer.add_rope_freq_base, rope_theta),
        (writer.add_rope_dimension_count, head_dim),
        (writer.add_vocab_size, vocab),
        (writer.add_tokenizer_model, "gpt2"),
        (writer.add_tokenizer_pre, "default"),
        (writer.add_token_list, tokens),
        (writer.add_token_merges, list(merges)),
        (writer.add_token_types, [3 if t in _GGUF_SPECIALS else 1 for t in tokens]),
        (writer.add_bos_token_id, 1),
        (writer.add_eos_token_id, 2),
        (writer.add_add_bos_token, False),
        (writer.add_chat_template, GGUF_CHAT_TEMPLATE),
    ]:
        add(value)  # type: ignore[operator]
    block = gguf.GGMLQuantizationType[qtype]
    named = dict(_gguf_named(tensors, heads, kv_heads))
    if rope_freqs is not None:
        named["rope_freqs.weight"] = rope_freqs
    for name, tensor in named.items():
        values = tensor.detach().float().numpy().astype(np.float32)
        if values.ndim == 2 and block != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, gguf.quants.quantize(values, block), raw_dtype=block)
        else:
            writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def _gguf_named(
    tensors: Mapping[str, torch.Tensor], heads: int, kv_heads: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """Hugging Face names -> llama.cpp's, Q/K rows permuted as its converter does."""
    for name, tensor in tensors.items():
        if name in _GGUF_TOP:
            yield _GGUF_TOP[name], tensor
            continue
        _, _, i, rest = name.split(".", 3)
        short = _GGUF_LAYER[rest]
        if short == "attn_q.weight":
            tensor = _permute_rows(tensor, heads)
        elif short == "attn_k.weight":
            tensor = _permute_rows(tensor, kv_heads)
        yield f"blk.{i}.{short}", tensor


def _gguf_vocab() -> tuple[list[str], list[str]]:
    """Special tokens, the 256 GPT-2 byte symbols, then one token per merge."""
    from swarm.shards.tokenizer import bytes_to_unicode

    symbols = sorted(bytes_to_unicode().values())
    merged = [m.replace(" ", "") for m in _GGUF_MERGES]
    return [*_GGUF_SPECIALS, *symbols, *merged], list(_GGUF_MERGES)


def _permute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's converter's Q/K reordering: each head's rotary halves interleaved."""
    rows = weight.shape[0]
    w = weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])  # (heads, 2, half, in)
    return w.transpose(1, 2).reshape(weight.shape).contiguous()


def make_tiny_checkpoint(
    path: str | Path,
    arch: str = "llama",
    *,
    num_layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = 128,
    seed: int = 0,
    sharded: bool = False,
    tie_word_embeddings: bool = False,
    **config_overrides: Any,
) -> Path:
    """Save a random ``transformers`` model of ``arch`` ("llama", "mistral", "qwen2").

    ``sharded=True`` saves with a small ``max_shard_size`` so that layers spread over several
    files. ``config_overrides`` go to the transformers config (e.g. ``head_dim=32``,
    ``rope_scaling={...}``, ``attention_bias=True``). Returns the folder.

    Raises:
        ImportError: ``transformers`` is not installed (it is in the ``test`` extra).
        ValueError: unknown ``arch``.
    """
    import transformers

    if arch not in _ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; pick one of {sorted(_ARCHITECTURES)}")
    config_name, model_name = _ARCHITECTURES[arch]
    settings: dict[str, Any] = {
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 512,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        # larger than the usual 0.02, so attention is sharp and RoPE/masking errors show
        "initializer_range": 0.1,
    }
    if arch == "mistral":
        settings["sliding_window"] = None
    settings.update(config_overrides)
    config = getattr(transformers, config_name)(**settings)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # norms at exactly 1 would hide a missing norm weight
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(torch.randn_like(param) * 0.1)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.02)
    folder = Path(path)
    shard_size = _shard_size(model) if sharded else "5GB"
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=shard_size)
    return folder


def _shard_size(model: torch.nn.Module) -> int:
    """About one decoder layer's bytes, so shards split between layers."""
    layer: torch.nn.Module = model.model.layers[0]  # type: ignore[index, union-attr, assignment]
    return sum(p.numel() * p.element_size() for p in layer.parameters()) + 1024
