"""Token sampling: greedy, temperature, top-k, top-p, seeds."""

from __future__ import annotations

import pytest
import torch

from swarm.client.sampling import Sampler, SamplingConfig
from swarm.errors import ConfigError


def test_greedy_is_argmax() -> None:
    logits = torch.tensor([[0.1, 3.0, 2.0], [5.0, 1.0, 0.0]])
    assert Sampler(SamplingConfig())(logits).tolist() == [1, 0]


def test_same_seed_same_tokens_and_different_seeds_differ() -> None:
    logits = torch.zeros(1, 1000)
    a = Sampler(SamplingConfig(temperature=1.0, seed=7))
    b = Sampler(SamplingConfig(temperature=1.0, seed=7))
    seq_a = [int(a(logits)) for _ in range(20)]
    seq_b = [int(b(logits)) for _ in range(20)]
    c = Sampler(SamplingConfig(temperature=1.0, seed=8))
    assert seq_a == seq_b
    assert [int(c(logits)) for _ in range(20)] != seq_a


def test_top_k_only_draws_from_the_k_best() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.0, -1.0, -2.0]])
    sampler = Sampler(SamplingConfig(temperature=5.0, top_k=2, seed=0))
    assert {int(sampler(logits)) for _ in range(200)} == {0, 1}


def test_top_p_keeps_the_smallest_nucleus() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    sampler = Sampler(SamplingConfig(temperature=1.0, top_p=0.8, seed=0))
    assert {int(sampler(probs.log())) for _ in range(300)} == {0, 1}


def test_bad_settings_are_config_errors() -> None:
    for kwargs in ({"temperature": -1.0}, {"top_k": -3}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ConfigError):
            SamplingConfig(**kwargs)  # type: ignore[arg-type]
