"""Hidden-state comparison: honest pairs pass, lies and non-finite values fail."""

from __future__ import annotations

import torch

from swarm.testing.adversaries import corruptor
from swarm.verify.compare import compare, first_mismatch, thresholds_for

F32 = thresholds_for("float32", "float32")
MIXED = thresholds_for(torch.float32, torch.bfloat16)


def hidden(seed: int, seq: int = 6) -> torch.Tensor:
    return torch.randn(1, seq, 64, generator=torch.Generator().manual_seed(seed))  # (1, seq, 64)


def test_identical_and_rounding_pass() -> None:
    x = hidden(0)
    assert compare(x, x.clone(), F32).ok
    assert compare(x, x.to(torch.bfloat16).float(), MIXED).ok
    assert not compare(x, x.to(torch.bfloat16).float(), F32).ok


def test_noise_of_one_percent_fails_between_float32_peers() -> None:
    x = hidden(1)
    noisy = corruptor("noise:0.01", seed=3)(x, x)
    verdict = compare(x, noisy, F32)
    assert not verdict.ok and verdict.rel_l2 > F32.max_rel_l2


def test_nan_and_inf_always_fail_and_name_the_position() -> None:
    x = hidden(2)
    bad = x.clone()
    bad[0, 3, 5] = float("nan")
    verdict = compare(x, bad, MIXED)
    assert not verdict.ok and verdict.first_bad == 3 and "NaN" in verdict.reason
    bad[0, 3, 5] = float("inf")
    assert first_mismatch(x, bad, MIXED) == 3


def test_skip_zeros_and_shape_fail() -> None:
    x = hidden(3)
    out = hidden(4)
    assert not compare(out, corruptor("skip")(x, out), MIXED).ok
    assert not compare(out, torch.zeros_like(out), MIXED).ok
    assert not compare(out, out[:, :2], MIXED).ok


def test_first_mismatch_finds_the_first_lying_position() -> None:
    x = hidden(5, seq=10)
    y = x.clone()
    y[:, 7:] += 0.5
    assert first_mismatch(x, y, F32) == 7
    assert first_mismatch(x, x, F32) is None
