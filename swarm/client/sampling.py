"""Choosing the next token from logits: greedy, temperature, top-k, top-p, seeded."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from swarm.errors import ConfigError

__all__ = [
    "Sampler",
    "SamplingConfig",
    "distribution",
    "processed_logits",
    "sampling_config",
]


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen.

    ``temperature == 0`` is greedy decoding (argmax); otherwise logits are divided by the
    temperature, then cut to the ``top_k`` most likely tokens (0 = no cut) and to the
    smallest set whose probability reaches ``top_p`` (1.0 = no cut), then sampled with a
    generator seeded by ``seed`` (None = nondeterministic).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise ConfigError(f"seed must fit 64 bits (-2**63 .. 2**64-1), got {self.seed}")


def sampling_config(
    sampling: SamplingConfig | None, shortcuts: Mapping[str, Any]
) -> SamplingConfig:
    """``sampling`` (greedy when None) with keyword shortcuts (``temperature=0.8``...) applied.

    The one place where `RemoteModel`'s keyword shortcuts become a `SamplingConfig`. Raises
    `ConfigError` for a name that is not a `SamplingConfig` field.
    """
    base = sampling or SamplingConfig()
    if not shortcuts:
        return base
    names = {f.name for f in fields(SamplingConfig)}
    unknown = sorted(set(shortcuts) - names)
    if unknown:
        raise ConfigError(f"unknown sampling option {unknown[0]!r}; use {', '.join(sorted(names))}")
    return replace(base, **shortcuts)


def processed_logits(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """``logits`` (..., vocab) as the sampler sees them: divided by the temperature, cut to
    top-k and top-p (cut entries are -inf). Greedy (temperature 0) returns them unchanged."""
    logits = logits.float()
    if config.temperature == 0.0:
        return logits
    logits = logits / config.temperature
    if config.top_k > 0:
        k = min(config.top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= config.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def distribution(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """The probabilities (..., vocab) the sampler draws from (one-hot on the argmax when
    greedy): the target distribution of speculative sampling."""
    if config.temperature == 0.0:
        top = logits.float().argmax(dim=-1, keepdim=True)
        return torch.zeros_like(logits, dtype=torch.float32).scatter_(-1, top, 1.0)
    return processed_logits(logits, config).softmax(dim=-1)


def _position_seed(seed: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class Sampler:
    """One per generation. The randomness of the token at index ``i`` of the answer comes
    from its own generator, seeded by ``(seed, i)``: with a seed the same tokens come back
    whatever happened before them (a retried step, a rollback, a speculative round of any
    length), and a drafter can draw with the same noise (`noise`) so that its guess matches
    the target's choice whenever their distributions agree.

    Sampling is Gumbel-max: ``argmax(processed_logits + g)`` with ``g`` standard Gumbel
    noise, which draws exactly from ``softmax(processed_logits)``.
    """

    def __init__(self, config: SamplingConfig) -> None:
        self.config = config
        self.seed = config.seed if config.seed is not None else secrets.randbits(63)
        self._calls = 0

    def noise(self, index: int, shape: tuple[int, ...]) -> torch.Tensor:
        """The Gumbel noise (shape) for the token at answer index ``index``."""
        generator = torch.Generator()
        generator.manual_seed(_position_seed(self.seed, index))
        uniform = torch.rand(shape, generator=generator).clamp_(min=1e-20, max=1.0 - 1e-7)
        return -torch.log(-torch.log(uniform))

    def sample(self, logits: torch.Tensor, index: int) -> torch.Tensor:
        """Token ids ``(batch,)`` from logits ``(batch, vocab)`` for answer index ``index``."""
        if self.config.temperature == 0.0:
            return logits.float().argmax(dim=-1)
        processed = processed_logits(logits, self.config)
        return (processed + self.noise(index, tuple(processed.shape))).argmax(dim=-1)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Next token ids ``(batch,)`` from last-position logits ``(batch, vocab)``, counting
        indexes by calls (prefer `sample` with the token's index in the answer)."""
        tokens = self.sample(logits, self._calls)
        self._calls += 1
        return tokens
