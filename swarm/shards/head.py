"""`Head`: what a client keeps locally: token embeddings, the final norm, and lm_head."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from swarm.errors import ShardError
from swarm.shards.blocks import RMSNorm
from swarm.shards.checkpoint import checkpoint_names, read_tensors
from swarm.shards.config import ModelConfig
from swarm.shards.gguf_header import is_gguf

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
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embeddings.weight

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


def load_head(
    path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Head:
    """Load only the embeddings, the final norm and (unless tied) lm_head of the checkpoint at
    ``path`` (a Hugging Face folder or a GGUF file, dequantized to ``dtype``).

    Raises:
        ShardError: unsupported config, missing files or tensors, or wrong shapes.
    """
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
    return head.eval()
