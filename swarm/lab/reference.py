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
from swarm.shards import KVCache, ModelConfig, Quantization, load_head, load_span
from swarm.types import LayerRange

__all__ = ["LocalGeneration", "LocalModel", "generate_locally"]


@dataclass
class LocalGeneration:
    """New token ids and the seconds each took (the first includes the prompt's prefill)."""

    ids: list[int] = field(default_factory=list)
    timings: list[float] = field(default_factory=list)


class LocalModel:
    """The whole model loaded in this process (float32, CPU), for repeated generations.
    ``head_quant`` int8 keeps lm_head in int8 (see `swarm.shards.head`; float by default);
    ``head_screen`` finds greedy tokens through the float head's screen (the same tokens,
    `swarm.shards.screen`), as a client does by default."""

    def __init__(
        self,
        path: str | Path,
        *,
        head_quant: Quantization = Quantization.NONE,
        head_screen: bool = True,
    ) -> None:
        self.path = Path(path)
        self.config = ModelConfig.from_pretrained(self.path)
        self.head = load_head(self.path, quant=head_quant, screen=head_screen)
        self.span = load_span(self.path, LayerRange(0, self.config.num_hidden_layers))

    def generate(
        self, prompt: Sequence[int], new_tokens: int, sampling: SamplingConfig | None = None
    ) -> LocalGeneration:
        """Generate `new_tokens` after `prompt` (ids): one prefill, then one cached step per
        token, like a swarm session. Does not stop at EOS."""
        cache = KVCache.allocate(self.config, self.span.layers, 1, len(prompt) + new_tokens)
        sampler = Sampler(sampling or SamplingConfig())
        greedy = sampler.config.temperature == 0.0
        head = self.head.greedy_logits if greedy else self.head.logits
        ids = torch.tensor([list(prompt)])  # (1, prompt_len)
        out, position = LocalGeneration(), 0
        with torch.inference_mode():  # cheaper than no_grad: no version counters
            for _ in range(new_tokens):
                started = time.perf_counter()
                n = ids.shape[1]
                positions = torch.arange(position, position + n).view(1, n)  # (1, n)
                hidden = self.span(self.head.embed(ids), positions, cache)  # (1, n, hidden)
                token = int(sampler(head(hidden[:, -1:])[:, -1])[0])
                position += n
                ids = torch.tensor([[token]])
                out.ids.append(token)
                out.timings.append(time.perf_counter() - started)
        return out


def generate_locally(
    path: str | Path,
    prompt: Sequence[int],
    new_tokens: int,
    sampling: SamplingConfig | None = None,
) -> LocalGeneration:
    """Load the model at `path` in this process and generate (see `LocalModel.generate`)."""
    return LocalModel(path).generate(prompt, new_tokens, sampling)
