"""`KVCache`: the per-session key/value cache of one span, owned outside the modules.

A session allocates one cache for ``max_length`` tokens up front (so a server can refuse what
it cannot hold), passes it into every :meth:`Span.forward <swarm.shards.span.Span.forward>`,
and drops it when the session ends. A forward call writes its new keys/values at slots
``length .. length+seq-1`` and then advances ``length``; the usual pattern is one prefill of
many tokens followed by single-token steps. :meth:`KVCache.truncate` rolls back the last
steps (verification re-runs them).

Batches (``batch_size > 1``) use **left padding**:

- Every row holds the same number of slots. A shorter sequence is padded on the left, and the
  forward call's ``attention_mask`` (batch, seq) marks real tokens with 1/True and padding
  with 0/False. The cache remembers these flags, so later steps only pass the mask of their
  own new tokens (or none: new tokens are then real).
- ``positions`` (batch, seq) are per row and count real tokens only: for a row with ``p``
  pads the first real token has position 0 (e.g. ``positions = (mask.cumsum(-1) - 1)
  .clamp(min=0)``). Decode steps then continue each row from its own last position.
- Padded slots are never attended to. The outputs at padded positions are meaningless (but
  finite) and should be ignored.
"""

from __future__ import annotations

import torch

from swarm.errors import ShardError
from swarm.shards.config import ModelConfig
from swarm.types import LayerRange

__all__ = ["KVCache"]


class KVCache:
    """Keys and values of ``layers`` for ``batch_size`` rows and up to ``max_length`` tokens.

    Build with :meth:`allocate`. ``keys[i]``/``values[i]`` belong to layer
    ``layers.start + i`` and have shape (batch, kv_heads, max_length, head_dim);
    ``token_mask`` (batch, max_length) is True where a slot holds a real (non-padding) token.
    """

    def __init__(
        self,
        layers: LayerRange,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        token_mask: torch.Tensor,
    ) -> None:
        self.layers = layers
        self.keys = keys
        self.values = values
        self.token_mask = token_mask
        self.batch_size, _, self.max_length, _ = keys[0].shape
        self.length = 0
        self.has_padding = False

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        layers: LayerRange,
        batch_size: int,
        max_length: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> KVCache:
        """Allocate (uninitialized) storage; costs :attr:`nbytes` of memory on ``device``.

        Raises:
            ShardError: ``batch_size`` or ``max_length`` is not positive, or ``layers`` is
                outside the model.
        """
        if batch_size <= 0 or max_length <= 0:
            raise ShardError(
                f"cache needs batch_size > 0 and max_length > 0, got {batch_size}, {max_length}"
            )
        if layers.stop > config.num_hidden_layers:
            raise ShardError(
                f"layers {layers} are outside the model ({config.num_hidden_layers} layers)"
            )
        shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)
        keys = [torch.empty(shape, dtype=dtype, device=device) for _ in layers]
        values = [torch.empty(shape, dtype=dtype, device=device) for _ in layers]
        token_mask = torch.ones(batch_size, max_length, dtype=torch.bool, device=device)
        return cls(layers, keys, values, token_mask)

    def clone(self) -> KVCache:
        """A copy with storage of its own (same tokens, same room)."""
        copy = KVCache(
            self.layers,
            [k.clone() for k in self.keys],
            [v.clone() for v in self.values],
            self.token_mask.clone(),
        )
        copy.length, copy.has_padding = self.length, self.has_padding
        return copy

    @property
    def nbytes(self) -> int:
        """Bytes held by keys, values and the token mask."""
        tensors = [*self.keys, *self.values, self.token_mask]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the stored keys and values."""
        return self.keys[0].dtype

    def reset(self) -> None:
        """Forget every stored token (the storage is kept)."""
        self.truncate(0)

    def truncate(self, length: int) -> None:
        """Keep only the first ``length`` tokens (roll back later steps).

        Raises:
            ShardError: ``length`` is negative or more than is stored.
        """
        if not 0 <= length <= self.length:
            raise ShardError(f"cannot truncate a cache of {self.length} tokens to {length}")
        self.length = length
        if length == 0:
            self.has_padding = False

    def check_room(self, seq: int) -> None:
        """Raise ShardError when ``seq`` more tokens do not fit."""
        if self.length + seq > self.max_length:
            raise ShardError(
                f"KV cache is full: {self.length} tokens stored + {seq} new > "
                f"max_length {self.max_length}"
            )

    def write_mask(self, mask: torch.Tensor | None, seq: int) -> None:
        """Record which of the next ``seq`` slots hold real tokens (``mask`` (batch, seq))."""
        slots = self.token_mask[:, self.length : self.length + seq]  # (batch, seq)
        if mask is None:
            slots.fill_(True)
            return
        slots.copy_(mask.to(torch.bool))
        if not bool(slots.all()):
            self.has_padding = True

    def update(
        self, index: int, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``key``/``value`` (batch, kv_heads, seq, head_dim) of layer ``index`` (relative)
        at the next slots; return all keys/values so far, (batch, kv_heads, length+seq, head_dim).

        Does not advance :attr:`length`; the span calls :meth:`advance` after its last layer.
        """
        seq, keys, values = key.shape[2], self.keys[index], self.values[index]
        keys.narrow(2, self.length, seq).copy_(key)  # (batch, kv_heads, seq, head_dim)
        values.narrow(2, self.length, seq).copy_(value)
        end = self.length + seq
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def advance(self, seq: int) -> None:
        """Mark ``seq`` more tokens as stored."""
        self.length += seq
