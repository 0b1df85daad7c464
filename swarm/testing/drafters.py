"""Drafters for tests and benchmarks: guesses of known quality.

`OracleDrafter` knows the answer (from a plain run) and guesses each next token right with
probability ``acceptance``, else a wrong one: the benchmark's model of the gain of
speculation at a given acceptance rate, free of any real drafter's quirks.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from swarm.client.sampling import Sampler
from swarm.client.speculation import Draft

__all__ = ["OracleDrafter"]


class OracleDrafter:
    """Guesses ``answer`` (the ids after a prompt of ``prompt_length``), each guess right with
    probability ``acceptance`` (a seeded coin), wrong otherwise (a neighbouring id)."""

    def __init__(
        self, answer: Sequence[int], prompt_length: int, acceptance: float, *, seed: int = 0
    ) -> None:
        self.answer = list(answer)
        self.prompt_length = prompt_length
        self.acceptance = acceptance
        self._rng = random.Random(seed)

    def propose(self, context: Sequence[int], k: int, sampler: Sampler, first_index: int) -> Draft:
        del sampler
        start = len(context) - self.prompt_length
        guesses = []
        for i in range(start, min(start + k, len(self.answer))):
            right = self.answer[i]
            wrong = right - 1 if right > 0 else right + 1  # inside the vocabulary
            guesses.append(right if self._rng.random() < self.acceptance else wrong)
        return Draft(tuple(guesses))
