"""Seeded statistics of the policies, simulated over recorded real outputs of a tiny model.

The policy code is the real `Verifier`; the peers' answers come from real span computations
recorded once (float32, bfloat16, perturbed weights) and rewritten by the real adversaries.
End-to-end runs of the same scenarios on in-process swarms are in test_end_to_end.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from swarm.shards import load_head, load_span
from swarm.testing.adversaries import corruptor, perturb_weights
from swarm.testing.simulate import Recording, SimPeer, record_outputs, simulate_hop
from swarm.types import LayerRange
from swarm.verify.policy import parse_policy

PROMPT, STEPS = 8, 30
CHUNKS = [PROMPT] + [1] * (STEPS - 1)  # 30 steps: the prefill and 29 decoded tokens
WHOLE = LayerRange(0, 4)


def inputs(model4: Path, seed: int) -> torch.Tensor:
    ids = torch.randint(
        0, 128, (1, PROMPT + STEPS - 1), generator=torch.Generator().manual_seed(seed)
    )
    with torch.no_grad():
        return load_head(model4).embed(ids).float()  # (1, seq, hidden)


@pytest.fixture(scope="module")
def recordings(model4: Path) -> dict[str, tuple[torch.Tensor, Recording]]:
    x = inputs(model4, 0)
    other = load_span(model4, WHOLE)
    perturb_weights(other, seed=7)
    return {
        "float32": (x, record_outputs(load_span(model4, WHOLE), x, CHUNKS)),
        "bfloat16": (x, record_outputs(load_span(model4, WHOLE, dtype=torch.bfloat16), x, CHUNKS)),
        "other": (x, record_outputs(other, x, CHUNKS)),
    }


def honest_checkers(recs: dict[str, tuple[torch.Tensor, Recording]]) -> list[SimPeer]:
    return [
        SimPeer.make("honest-a", recs["float32"][1]),
        SimPeer.make("honest-b", recs["float32"][1]),
        SimPeer.make("honest-c", recs["bfloat16"][1]),
    ]


@pytest.mark.parametrize("kind", ["noise:0.01", "skip", "zeros", "other-weights"])
async def test_spot_check_catches_every_kind_within_30_steps(
    recordings: dict[str, tuple[torch.Tensor, Recording]], kind: str
) -> None:
    x, honest = recordings["float32"]
    policy = parse_policy("spot-check:0.2")
    caught = 0
    for trial in range(100):
        if kind == "other-weights":
            liar = SimPeer.make("liar", recordings["other"][1], liar=True)
        else:
            liar = SimPeer.make("liar", honest, corruptor(kind, seed=trial))
        result = await simulate_hop(x, liar, honest_checkers(recordings), policy, seed=trial)
        assert result.flagged_honest == 0
        if result.detected_at is not None and result.detected_at < STEPS:
            caught += 1
            assert result.rollback_position == 0  # it lied from the prefill on: redo it all
    assert caught >= 99


async def test_redundant_three_always_outvotes_one_liar(
    recordings: dict[str, tuple[torch.Tensor, Recording]],
) -> None:
    x, honest = recordings["float32"]
    checkers = honest_checkers(recordings)[:2]
    for trial in range(100):
        liar = SimPeer.make("liar", honest, corruptor("cheat:0.3:noise:0.01", seed=trial))
        result = await simulate_hop(x, liar, checkers, parse_policy("redundant:3"), seed=trial)
        assert result.flagged_honest == 0
        coin = torch.Generator().manual_seed(trial)  # the same coin flips as the liar's
        lies = [bool(torch.rand((), generator=coin) < 0.3) for _ in range(STEPS)]
        first_lie = lies.index(True) if True in lies else None
        assert result.detected_at == first_lie  # every step voted: caught at its first lie


async def test_optimistic_finds_the_first_lying_position(
    recordings: dict[str, tuple[torch.Tensor, Recording]],
) -> None:
    x, honest = recordings["float32"]
    liar = SimPeer.make("liar", honest, corruptor("after:12:skip"))
    result = await simulate_hop(
        x, liar, honest_checkers(recordings), parse_policy("optimistic"), seed=0
    )
    assert result.detected_at == STEPS - 1 and result.checks == 1
    assert result.rollback_position == PROMPT + 12 - 1  # step 12's input position


async def test_colluders_win_only_with_a_majority(
    recordings: dict[str, tuple[torch.Tensor, Recording]],
) -> None:
    x, honest = recordings["float32"]
    liar = SimPeer.make("liar", honest, corruptor("collude:5"))
    friend = SimPeer.make("friend", honest, corruptor("collude:5"))
    fair = SimPeer.make("honest", honest)
    one_third = await simulate_hop(
        x, liar, [fair, SimPeer.make("h2", honest)], parse_policy("redundant:3"), seed=0
    )
    assert one_third.detected_at == 0
    two_thirds = await simulate_hop(x, liar, [friend, fair], parse_policy("redundant:3"), seed=0)
    assert two_thirds.detected_at is None  # the limit of voting: a colluding majority wins
    assert two_thirds.flagged_honest == 1  # and the honest checker is the one outvoted


async def test_no_honest_peer_is_flagged_over_1000_checks(model4: Path) -> None:
    """float32 and bfloat16 peers checking each other, every step (spot-check:1)."""
    spans = {
        "float32": load_span(model4, WHOLE),
        "bfloat16": load_span(model4, WHOLE, dtype=torch.bfloat16),
    }
    checks = 0
    for seed in range(1, 23):
        x = inputs(model4, seed)
        recs = {name: record_outputs(span, x, CHUNKS) for name, span in spans.items()}
        for primary in recs:
            checkers = [SimPeer.make(f"c-{name}", rec) for name, rec in recs.items()]
            checkers.append(SimPeer.make("c-extra", recs["bfloat16"]))
            result = await simulate_hop(
                x,
                SimPeer.make(f"p-{primary}", recs[primary]),
                checkers,
                parse_policy("spot-check:1"),
                seed=seed,
            )
            assert result.flagged_honest == 0 and result.detected_at is None
            checks += result.checks
    assert checks >= 1000
