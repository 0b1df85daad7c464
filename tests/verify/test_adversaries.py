"""The testing adversaries lie the way their specs say."""

from __future__ import annotations

import pytest
import torch

from swarm.errors import ConfigError
from swarm.testing.adversaries import adversary_wrapper, corruptor, perturb_weights


def pair(seq: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seq)
    return torch.randn(1, seq, 16, generator=g), torch.randn(1, seq, 16, generator=g)


def test_after_n_is_honest_then_lies() -> None:
    lie = corruptor("after:2:zeros")
    x, out = pair()
    assert torch.equal(lie(x, out), out) and torch.equal(lie(x, out), out)
    assert torch.equal(lie(x, out), torch.zeros_like(out))


def test_cheat_with_probability_q() -> None:
    lie = corruptor("cheat:0.3:zeros", seed=1)
    x, out = pair()
    lied = sum(bool((lie(x, out) == 0).all()) for _ in range(1000))
    assert 200 < lied < 400
    assert all(torch.equal(corruptor("cheat:0:skip")(x, out), out) for _ in range(20))


def test_colluders_agree_per_position_in_steps_and_whole_forwards() -> None:
    a, b = corruptor("collude:9"), corruptor("collude:9")
    x, out = pair(6)
    whole = a(x, out)  # (1, 6, 16)
    stepwise = torch.cat([b(x[:, i : i + 1], out[:, i : i + 1]) for i in range(6)], dim=1)
    assert torch.allclose(whole, stepwise)
    assert not torch.allclose(whole, out)
    assert not torch.allclose(corruptor("collude:10")(x, out), whole)


def test_other_weights_perturbs_in_place_and_bad_specs_are_refused() -> None:
    layer = torch.nn.Linear(8, 8)
    before = layer.weight.clone()
    perturb_weights(layer, seed=3)
    assert not torch.equal(before, layer.weight)
    for spec in ("nois:1", "noise:x", "cheat:y", "after:z", "other-weights:q", "collude:"):
        with pytest.raises(ConfigError):
            adversary_wrapper(spec)
