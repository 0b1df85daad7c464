"""`Span`: a contiguous range of decoder layers, loaded alone from a checkpoint.

``load_span(path, LayerRange(a, b))`` reads only the tensors of layers ``a..b-1`` (see
:mod:`swarm.shards.checkpoint`): the modules are built on the ``meta`` device and the read
tensors are assigned in, so peak memory is about the size of the range.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from swarm.errors import ShardError
from swarm.shards.blocks import Block, RaggedBatch, RaggedPart, build_attention_mask
from swarm.shards.cache import KVCache
from swarm.shards.checkpoint import (
    checkpoint_names,
    layer_matrix_types,
    read_quantized,
    read_tensors,
)
from swarm.shards.config import ModelConfig
from swarm.shards.gguf_header import is_gguf
from swarm.shards.quant import QUANTIZED_LINEARS, Quantization, serving_quantization
from swarm.shards.rope import inverse_frequencies, rope_cos_sin
from swarm.types import LayerRange

__all__ = ["BatchItem", "Span", "load_span", "resolve_quantization"]


@dataclass(frozen=True)
class BatchItem:
    """One input of :meth:`Span.forward_batch`: hidden (batch, seq, hidden_size), positions
    (batch, seq) int64, and the cache it extends (None: a stateless forward)."""

    hidden: torch.Tensor
    positions: torch.Tensor
    cache: KVCache | None = None


class Span(nn.Module):
    """Decoder layers ``layers.start .. layers.stop-1`` of a model, in eval mode.

    Holds parameters only; a session's :class:`~swarm.shards.cache.KVCache` is passed to
    :meth:`forward`. Safe to call under ``torch.inference_mode()`` from a worker thread (one
    call per cache at a time).
    """

    def __init__(self, config: ModelConfig, layers: LayerRange, blocks: Sequence[Block]) -> None:
        super().__init__()
        self.config = config
        self.layers = layers
        self.blocks = nn.ModuleList(blocks)
        self.quantization = Quantization.NONE  # how the projection weights are kept
        self.quantization_exact = True  # whether they still equal the checkpoint's
        self.inv_freq = inverse_frequencies(config)  # (head_dim/2,) float32; not a parameter

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights (and of the hidden states forward expects)."""
        return self._first_parameter().dtype

    @property
    def numerics(self) -> str:
        """How verification should compare this span's outputs (`swarm.verify.compare`): its
        dtype; for quantized weights that equal the checkpoint's own (int4 from GGUF
        Q4_0/Q4_1), ``"bfloat16"``, since the kernels multiply in bfloat16 (see
        :data:`swarm.shards.quant.COMPUTE_DTYPE`); for requantized weights the dtype plus the
        quantization (``"float32+int8"``), whose pairs have their own calibrated thresholds."""
        name = str(self.dtype).removeprefix("torch.")
        if self.quantization is Quantization.NONE:
            return name
        if self.quantization_exact:
            return "bfloat16" if name == "float32" else name
        return f"{name}+{self.quantization.value}"

    @property
    def device(self) -> torch.device:
        """The device the weights live on."""
        return self._first_parameter().device

    def _first_parameter(self) -> torch.Tensor:
        """What ``next(iter(self.parameters()))`` gives (the first block's first norm
        weight: norms are never quantized), in a few attribute reads instead of a walk of
        the module tree (~12 us, several times per step)."""
        if len(self.blocks):
            first: Block = self.blocks[0]  # type: ignore[assignment]
            return first.attn_norm.weight
        return next(iter(self.parameters()))

    def narrow(self, layers: LayerRange) -> Span:
        """A span over a sub-range of ours, sharing our weights (no copy).

        Raises:
            ShardError: ``layers`` is not inside :attr:`layers`.
        """
        if layers.start < self.layers.start or layers.stop > self.layers.stop:
            raise ShardError(f"layers {layers} are not inside this span's {self.layers}")
        offset = self.layers.start
        blocks = [self.blocks[i - offset] for i in layers]
        span = Span(self.config, layers, blocks)  # type: ignore[arg-type]
        span.quantization = self.quantization
        span.quantization_exact = self.quantization_exact
        return span.eval()

    def forward(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run ``hidden`` (batch, seq, hidden_size) through the layers; same shape out.

        ``positions`` (batch, seq) int64 are the RoPE positions of the new tokens.
        ``attention_mask`` (batch, seq), 1/True for real tokens and 0/False for (left)
        padding, covers the new tokens only; with a ``cache`` the flags of earlier tokens are
        remembered there (see :mod:`swarm.shards.cache` for the batching rules). With a
        ``cache`` the new keys/values are stored and ``cache.length`` advances by ``seq``.

        Raises:
            ShardError: shapes or dtype do not match the span, the cache belongs to other
                layers or another batch size, or the cache has no room for ``seq`` tokens.
        """
        self._check_inputs(hidden, positions, cache, attention_mask)
        part = self._prepare(hidden, positions, cache, attention_mask)
        ragged = RaggedBatch.of([part])
        x = hidden.reshape(-1, self.config.hidden_size)  # (batch*seq, hidden)
        for index, block in enumerate(self.blocks):
            x = block(x, ragged, index)  # (batch*seq, hidden)
        if cache is not None:
            cache.advance(part.seq)
        return x.view(hidden.shape)

    def forward_batch(self, items: Sequence[BatchItem]) -> list[torch.Tensor]:
        """Run several independent inputs through the layers as one ragged batch.

        Each item is what one :meth:`forward` call would take (without an attention mask):
        hidden (batch_i, seq_i, hidden_size), positions (batch_i, seq_i) and its own cache or
        None. The projections and MLPs run once over all items' tokens laid end to end;
        attention runs per item against its own cache with its own positions. Returns each
        item's output, as :meth:`forward` would (equal within float rounding), and advances
        each cache.

        Raises:
            ShardError: as :meth:`forward`, for any item (before any cache is touched);
                two items sharing one cache.
        """
        caches = [id(item.cache) for item in items if item.cache is not None]
        if len(set(caches)) != len(caches):
            raise ShardError("two items of one batch share a cache")
        for item in items:
            self._check_inputs(item.hidden, item.positions, item.cache, None)
            if item.cache is not None:
                item.cache.check_room(item.hidden.shape[1])
        parts = [self._prepare(it.hidden, it.positions, it.cache, None) for it in items]
        ragged = RaggedBatch.of(parts)
        size = self.config.hidden_size
        x = torch.cat([it.hidden.reshape(-1, size) for it in items])  # (tokens, hidden)
        for index in range(len(self.blocks)):
            block: Block = self.blocks[index]  # type: ignore[assignment]
            x = block(x, ragged, index)  # (tokens, hidden)
        outs = torch.split(x, [p.batch * p.seq for p in parts])
        for item, part in zip(items, parts, strict=True):
            if item.cache is not None:
                item.cache.advance(part.seq)
        return [out.view(p.batch, p.seq, size) for out, p in zip(outs, parts, strict=True)]

    def _prepare(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None,
        attention_mask: torch.Tensor | None,
    ) -> RaggedPart:
        """Record the new tokens' mask in the cache; build their attention pattern and RoPE
        angles."""
        batch, seq = hidden.shape[:2]
        start, key_valid = 0, None
        if cache is not None:
            cache.check_room(seq)
            start = cache.length
            cache.write_mask(attention_mask, seq)
            if cache.has_padding:
                key_valid = cache.token_mask[:, : start + seq]  # (batch, start+seq)
        elif attention_mask is not None and not bool(attention_mask.all()):
            key_valid = attention_mask.to(torch.bool)  # (batch, seq)
        mask = build_attention_mask(seq, start, key_valid, hidden.device)
        inv_freq = self.inv_freq.to(hidden.device)
        cos, sin = rope_cos_sin(inv_freq, positions, hidden.dtype)  # (batch, seq, 1, head_dim)
        return RaggedPart(batch, seq, cos, sin, mask, cache)

    def _check_inputs(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None,
        attention_mask: torch.Tensor | None,
    ) -> None:
        size = self.config.hidden_size
        if hidden.dim() != 3 or hidden.shape[-1] != size or hidden.shape[1] == 0:
            raise ShardError(
                f"hidden states must be (batch, seq, {size}), got {list(hidden.shape)}"
            )
        dtype = self.dtype
        if hidden.dtype != dtype:
            raise ShardError(f"hidden states are {hidden.dtype}, this span runs {dtype}")
        batch_seq = tuple(hidden.shape[:2])
        if tuple(positions.shape) != batch_seq or positions.dtype != torch.int64:
            raise ShardError(
                f"positions must be int64 {list(batch_seq)}, got {positions.dtype} "
                f"{list(positions.shape)}"
            )
        if attention_mask is not None and tuple(attention_mask.shape) != batch_seq:
            raise ShardError(
                f"attention_mask must be {list(batch_seq)}, got {list(attention_mask.shape)}"
            )
        if cache is not None and (cache.layers != self.layers or cache.batch_size != batch_seq[0]):
            raise ShardError(
                f"cache is for layers {cache.layers} and batch {cache.batch_size}, "
                f"span has layers {self.layers} and the input batch {batch_seq[0]}"
            )
        if cache is not None and cache.dtype != dtype:
            raise ShardError(f"cache holds {cache.dtype}, this span runs {dtype}")


def load_span(
    path: str | Path,
    layers: LayerRange,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    quant: Quantization | None = Quantization.NONE,
) -> Span:
    """Load layers ``layers.start .. layers.stop-1`` of the checkpoint at ``path`` (a Hugging
    Face folder or a GGUF file).

    Reads only those layers' tensors, from ``model.safetensors`` or the shard files of
    ``model.safetensors.index.json`` that hold them, or from the GGUF file's memory map
    (dequantized to ``dtype``). Costs about the range's size in memory.

    ``quant`` keeps the projection matrices int8 or int4 (see :mod:`swarm.shards.quant`;
    None: the checkpoint's own, :func:`serving_quantization`), quantized one matrix at a time
    (peak: one matrix in float32 more than the quantized range); GGUF Q4_0/Q4_1 go to int4
    without a float detour. :attr:`Span.quantization` says what was applied (none on a device
    without the kernels).

    Raises:
        ShardError: unsupported or unreadable config, ``layers`` outside the model, missing
            files or tensors, or a tensor of the wrong shape.
    """
    config = ModelConfig.from_pretrained(path)
    if layers.stop > config.num_hidden_layers:
        raise ShardError(
            f"layer range {layers} is outside the model: it has {config.num_hidden_layers} "
            f"layers (0:{config.num_hidden_layers})"
        )
    kind = resolve_quantization(path, quant, torch.device(device))
    with torch.device("meta"):
        span = Span(config, layers, [Block(config) for _ in layers])
    shapes = {key: tuple(t.shape) for key, t in span.state_dict().items()}
    matrices = [] if kind is Quantization.NONE else _matrix_keys(shapes)
    names = checkpoint_names(list(shapes), layers=layers, gguf=is_gguf(path))
    tensors = read_tensors(
        path,
        {names[key]: shape for key, shape in shapes.items() if key not in matrices},
        lambda t: t.to(device=device, dtype=dtype),
    )
    span.load_state_dict(
        {key: tensors[names[key]] for key in shapes if key not in matrices},
        assign=True,
        strict=False,
    )
    for key in matrices:  # one matrix in float at a time
        module = key.removesuffix(".weight")
        dense = span.get_submodule(module)
        if not isinstance(dense, nn.Linear):
            raise ShardError(f"{module} is not a linear layer")  # a bug in our modules
        linear = read_quantized(path, names[key], shapes[key], kind, dtype)
        if dense.bias is not None:
            linear.bias = dense.bias.detach()
        span.set_submodule(module, linear)
        span.quantization_exact = span.quantization_exact and linear.exact
    span.quantization = kind
    span.inv_freq = inverse_frequencies(config).to(device)
    span.requires_grad_(False)
    if matrices:
        for block in span.blocks:
            block.fuse_projections()  # type: ignore[operator]
        _return_freed_memory()
    return span.eval()


def _return_freed_memory() -> None:
    """Hand the float temporaries of quantizing back to the OS: glibc keeps freed heap pages
    (its mmap threshold grows with each large free), which held the resident size of an int4
    range at ~0.9x float32's, measured, instead of ~0.2x."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: nothing to do, or nothing we know how to do
    libc.malloc_trim(0)


def resolve_quantization(
    path: str | Path, requested: Quantization | None, device: torch.device
) -> Quantization:
    """What :func:`load_span` applies for ``requested`` (None: the checkpoint's own, see
    :func:`~swarm.shards.quant.serving_quantization`), from the checkpoint's headers only."""
    return serving_quantization(requested, layer_matrix_types(path), device)


def _matrix_keys(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The state-dict keys of the projection weights kept quantized."""
    return [k for k in shapes if k.split(".", 2)[-1].removesuffix(".weight") in QUANTIZED_LINEARS
            and k.endswith(".weight")]  # fmt: skip
