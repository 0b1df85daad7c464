"""Speculative decoding: several tokens per round trip through the chain (DESIGN §13).

A drafter guesses the next k tokens (`NgramDrafter` from the text so far, `ModelDrafter` from
a small local model with the target's tokenizer); the chain computes all k+1 positions in one
step; `accept` keeps the longest prefix the target agrees with plus one token of its own, so
the answer is the one plain decoding gives (greedy: exactly; sampling: the same tokens for a
seed, see `swarm.client.sampling.Sampler`). `SpeculationPlanner` picks k each round from the
measured acceptance and the cost of a round.
"""

from swarm.client.speculation.acceptance import Verdict, accept, accept_residual
from swarm.client.speculation.drafters import (
    Draft,
    Drafter,
    DraftModel,
    ModelDrafter,
    NgramDrafter,
)
from swarm.client.speculation.planner import (
    PlannerStatistics,
    SpeculationPlanner,
    expected_tokens,
)
from swarm.client.speculation.speculator import Speculator

__all__ = [
    "Draft",
    "DraftModel",
    "Drafter",
    "ModelDrafter",
    "NgramDrafter",
    "PlannerStatistics",
    "SpeculationPlanner",
    "Speculator",
    "Verdict",
    "accept",
    "accept_residual",
    "expected_tokens",
]
