"""The single-process baseline: a whole model generating in this process with our shards.

Tests compare the swarm's tokens with it; the benchmarks and `swarm demo` compare latency.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from swarm.client.sampling import Sampler, SamplingConfig
from swarm.shards import KVCache, LayerRange, ModelConfig, load_head, load_span

__all__ = ["LocalGeneration", "generate_locally"]


@dataclass
class LocalGeneration:
    """New token ids and the seconds each took (the first includes the prompt's prefill)."""

    ids: list[int] = field(default_factory=list)
    timings: list[float] = field(default_factory=list)


def generate_locally(
    path: str | Path,
    prompt: Sequence[int],
    new_tokens: int,
    sampling: SamplingConfig | None = None,
) -> LocalGeneration:
    """Generate `new_tokens` after `prompt` (ids) with the whole model in this process:
    one prefill, then one cached step per token, like a swarm session. Does not stop at EOS.
    """
    path = Path(path)
    config = ModelConfig.from_pretrained(path)
    head = load_head(path)
    span = load_span(path, LayerRange(0, config.num_hidden_layers))
    cache = KVCache.allocate(config, span.layers, 1, len(prompt) + new_tokens)
    sampler = Sampler(sampling or SamplingConfig())
    ids = torch.tensor([list(prompt)])  # (1, prompt_len)
    out, position = LocalGeneration(), 0
    with torch.no_grad():
        for _ in range(new_tokens):
            started = time.perf_counter()
            n = ids.shape[1]
            positions = torch.arange(position, position + n).view(1, n)  # (1, n)
            hidden = span(head.embed(ids), positions, cache)  # (1, n, hidden)
            token = int(sampler(head.logits(hidden[:, -1:])[:, -1])[0])
            position += n
            ids = torch.tensor([[token]])
            out.ids.append(token)
            out.timings.append(time.perf_counter() - started)
    return out
