"""The testing adversaries lie (or dawdle) the way their specs say."""

from __future__ import annotations

import pytest
import torch
import trio
import trio.testing

from swarm.errors import ConfigError
from swarm.server.compute import Priority
from swarm.testing.adversaries import (
    SlowingHandlers,
    StutteringHandlers,
    adversary_wrapper,
    corruptor,
    perturb_weights,
)


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


async def test_slow_waits_longer_each_time_and_bad_specs_are_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class Queue:  # the honest computation: the input back
        async def run_span(self, span: object, hidden: torch.Tensor, *_: object) -> torch.Tensor:
            return hidden

    handlers = SlowingHandlers.__new__(SlowingHandlers)  # no server behind it
    handlers.delay_s, handlers.factor, handlers.queue = 0.5, 2.0, Queue()  # type: ignore[assignment]
    x, _ = pair()
    waits = []
    for _ in range(3):
        start = trio.current_time()
        out = await handlers.compute(None, x, x, None, Priority.INFERENCE)  # type: ignore[arg-type]
        waits.append(trio.current_time() - start)
        assert torch.equal(out, x)  # honest answers, only late
    assert waits == pytest.approx([0.5, 1.0, 2.0])
    for spec in ("slow:", "slow:x", "slow:1:0", "slow:-1", "slow:1:2:3"):
        with pytest.raises(ConfigError):
            adversary_wrapper(spec)
    assert callable(adversary_wrapper("slow:5")) and callable(adversary_wrapper("slow:0.2:1.6"))


async def test_slow_every_n_waits_on_every_nth_computation_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class Queue:  # the honest computation: the input back
        async def run_span(self, span: object, hidden: torch.Tensor, *_: object) -> torch.Tensor:
            return hidden

    handlers = StutteringHandlers.__new__(StutteringHandlers)  # no server behind it
    handlers.every, handlers.delay_s, handlers.computations = 3, 0.75, 0
    handlers.queue = Queue()  # type: ignore[assignment]
    x, _ = pair()
    waits = []
    for _ in range(7):
        start = trio.current_time()
        out = await handlers.compute(None, x, x, None, Priority.INFERENCE)  # type: ignore[arg-type]
        waits.append(trio.current_time() - start)
        assert torch.equal(out, x)  # honest answers, only late now and then
    assert waits == pytest.approx([0, 0, 0.75, 0, 0, 0.75, 0])
    for spec in ("slow-every:", "slow-every:16", "slow-every:x:1", "slow-every:0:1",
                 "slow-every:16:-1", "slow-every:16:1:2", "slow-every:1.5:1"):  # fmt: skip
        with pytest.raises(ConfigError):
            adversary_wrapper(spec)
    assert callable(adversary_wrapper("slow-every:16:1.5"))
