"""Choosing the next token from logits: greedy, temperature, top-k, top-p, seeded."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from swarm.errors import ConfigError

__all__ = ["Sampler", "SamplingConfig", "sampling_config"]


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


class Sampler:
    """Stateful sampler: one per generation, so a seed gives the same tokens every run."""

    def __init__(self, config: SamplingConfig) -> None:
        self.config = config
        self._generator = torch.Generator()
        if config.seed is not None:
            self._generator.manual_seed(config.seed)
        else:
            self._generator.seed()

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Next token ids `(batch,)` from the last-position logits `(batch, vocab)`."""
        cfg = self.config
        logits = logits.float()
        if cfg.temperature == 0.0:
            return logits.argmax(dim=-1)
        logits = logits / cfg.temperature
        if cfg.top_k > 0:
            k = min(cfg.top_k, logits.shape[-1])
            kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (batch, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if cfg.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            # drop a token when the tokens before it already reach top_p
            drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= cfg.top_p
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        probs = logits.softmax(dim=-1)  # (batch, vocab)
        return torch.multinomial(probs, 1, generator=self._generator).squeeze(-1)
