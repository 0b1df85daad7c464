"""`Head`: what a client keeps locally: token embeddings, the final norm, and lm_head.

lm_head can be kept in int8 (`load_head(..., quant=Quantization.INT8)`): a 49,152 x 576
head read in float32 is 113 MB per token, in int8 28 MB, through PyTorch's weight-only int8
kernel (`swarm.shards.quant.Int8Linear`). That kernel has one scale per output row, where a
GGUF's own Q8_0 head has one per block of 32, so the int8 head is a requantization and its
logits differ from the float head's (SmolLM2: up to ~0.4 logits, and the greedy chat answer
changes after some tokens; see `benchmarks/vs_llama_cpp.py`). The float head stays the
default.

A float32 head can instead carry a greedy screen (`load_head(..., screen=True)`,
`swarm.shards.screen`): `Head.greedy_logits` then finds the float head's greedy token
exactly, through an int8 pass over the vocabulary and float32 for the few tokens that could
still win (SmolLM2: ~7 ms instead of ~10 ms per token); `Head.logits` stays the float head.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from swarm.errors import ShardError
from swarm.shards.blocks import RMSNorm
from swarm.shards.checkpoint import checkpoint_names, read_tensors
from swarm.shards.config import ModelConfig
from swarm.shards.gguf_header import is_gguf
from swarm.shards.quant import Quantization, QuantLinear, quantize_linear
from swarm.shards.screen import GreedyScreen

__all__ = ["Head", "load_head"]


class Head(nn.Module):
    """Embeddings in, logits out. With tied embeddings ``lm_head`` shares ``embeddings``' weight."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # a weight given is not initialised: `load_head` builds this on the meta device,
        # where nn.Embedding's own normal_ init would import torch._dynamo (seconds)
        weight = torch.empty(config.vocab_size, config.hidden_size)  # (vocab, hidden)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head: nn.Linear | QuantLinear = nn.Linear(
            config.hidden_size, config.vocab_size, bias=False
        )
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embeddings.weight
        self.quantization = Quantization.NONE  # how lm_head is kept (`quantize_lm_head`)
        self.screen: GreedyScreen | None = None  # see `greedy_logits`

    def build_screen(self) -> bool:
        """Give a float32 lm_head on the CPU a greedy screen (`greedy_logits`); False, and
        none, where it has none to give: another dtype or device, lm_head quantized, or a
        BLAS whose recomputed rows are not the whole matmul's bit for bit."""
        self.screen = None
        weight = self.lm_head.weight
        if not isinstance(self.lm_head, nn.Linear) or not isinstance(weight, torch.Tensor):
            return False
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            return False
        try:
            self.screen = GreedyScreen.build(weight)
        except ValueError:
            return False
        return True

    def quantize_lm_head(self) -> None:
        """Keep lm_head in int8, one scale per output row (the embeddings stay as they are).

        Each input column is first divided by its largest weight, and the final norm's
        weight multiplied by it (the same logits in exact arithmetic; measured on SmolLM2,
        it halves the requantization's error against plain per-row scales). Logits then
        differ from the float head's by the int8 rounding of the weights and the bfloat16
        rounding of the normed hidden state (the kernel's input)."""
        if not isinstance(self.lm_head, nn.Linear):
            return  # already quantized
        weight = self.lm_head.weight.to(torch.float32)  # (vocab, hidden)
        columns = weight.abs().amax(dim=0).clamp(min=1e-12)  # (hidden,)
        norm = RMSNorm(self.config.hidden_size, self.config.rms_norm_eps).to(self.device)
        norm.weight = nn.Parameter(
            (self.norm.weight.to(torch.float32) * columns).to(self.norm.weight.dtype),
            requires_grad=False,
        )
        self.norm = norm
        self.lm_head = quantize_linear(weight / columns, None, Quantization.INT8, self.dtype)
        self.quantization = Quantization.INT8

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights."""
        return self.embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        """The device the weights live on."""
        return self.embeddings.weight.device

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (batch, seq) int64 -> hidden states (batch, seq, hidden_size).

        Raises:
            ShardError: ids are not a 2-D integer tensor or fall outside the vocabulary.
        """
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ShardError(
                f"token ids must be int64 (batch, seq), got {ids.dtype} {list(ids.shape)}"
            )
        vocab = self.config.vocab_size
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ShardError(
                f"token ids must be in [0, {vocab}), got {int(ids.min())}..{int(ids.max())}"
            )
        return self.embeddings(ids)  # type: ignore[no-any-return]  # (batch, seq, hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states (batch, seq, hidden_size) -> logits (batch, seq, vocab_size).

        Raises:
            ShardError: the last dimension is not ``hidden_size``.
        """
        if hidden.dim() != 3 or hidden.shape[-1] != self.config.hidden_size:
            raise ShardError(
                f"hidden states must be (batch, seq, {self.config.hidden_size}), "
                f"got {list(hidden.shape)}"
            )
        return self.lm_head(self.norm(hidden.to(self.dtype)))  # type: ignore[no-any-return]

    def greedy_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (batch, seq, vocab) for greedy decoding: with a screen (`build_screen`),
        each position's argmax is exactly that of `logits` on that position alone (ties to
        the first index), but only the tokens that could win hold their float logits and the
        rest are -inf (`swarm.shards.screen`); without one, `logits`. Not for sampling.

        Raises:
            ShardError: the last dimension is not ``hidden_size``.
        """
        if self.screen is None:
            return self.logits(hidden)
        if hidden.dim() != 3 or hidden.shape[-1] != self.config.hidden_size:
            raise ShardError(
                f"hidden states must be (batch, seq, {self.config.hidden_size}), "
                f"got {list(hidden.shape)}"
            )
        normed = self.norm(hidden.to(self.dtype))  # (batch, seq, hidden): as `logits` feeds it
        flat = self.screen.logits(normed.reshape(-1, self.config.hidden_size))
        return flat.view(*hidden.shape[:-1], -1)  # (batch, seq, vocab)


def load_head(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    quant: Quantization = Quantization.NONE,
    screen: bool = False,
) -> Head:
    """Load only the embeddings, the final norm and (unless tied) lm_head of the checkpoint at
    ``path`` (a Hugging Face folder or a GGUF file, dequantized to ``dtype``). With ``quant``
    int8 on the CPU, lm_head is kept in int8 (`Head.quantize_lm_head`; elsewhere there is no
    kernel for it and it stays in ``dtype``). With ``screen``, a float32 head on the CPU gets
    a greedy screen (`Head.build_screen`: +1/4 of lm_head's bytes, ~0.5 s for SmolLM2).

    Raises:
        ShardError: unsupported config, missing files or tensors, or wrong shapes; ``quant``
            int4 (the head is kept in float or int8).
    """
    if quant is Quantization.INT4:
        raise ShardError("the head can be kept in float (none) or int8, not int4")
    config = ModelConfig.from_pretrained(path)
    with torch.device("meta"):
        head = Head(config)
    shapes = {key: tuple(t.shape) for key, t in head.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    names = checkpoint_names(list(shapes), gguf=is_gguf(path))
    tensors = read_tensors(
        path,
        {names[key]: shape for key, shape in shapes.items()},
        lambda t: t.to(device=device, dtype=dtype),
    )
    head.load_state_dict({key: tensors[names[key]] for key in shapes}, assign=True, strict=False)
    if config.tie_word_embeddings:
        head.lm_head.weight = head.embeddings.weight
    head.requires_grad_(False)
    if quant is Quantization.INT8 and head.device.type == "cpu":
        head.quantize_lm_head()
    if screen:
        head.build_screen()
    return head.eval()
