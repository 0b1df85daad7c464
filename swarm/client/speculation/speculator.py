"""`Speculator`: one generation's speculation, its drafter and its planner of k together.

The token loop asks `draft` before each step (what to guess after the text so far) and tells
`record` what came of it. `Speculator.for_mode` builds one from a `SpeculationConfig` mode:
``off`` gives None (plain decoding), ``ngram`` / ``auto`` prompt lookup, anything else the
draft model the caller loaded (`DraftModel`), shared by every generation of a client.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import trio

from swarm.client.sampling import Sampler
from swarm.client.speculation.drafters import (
    Drafter,
    DraftModel,
    ModelDrafter,
    NgramDrafter,
)
from swarm.client.speculation.planner import PlannerStatistics, SpeculationPlanner

__all__ = ["Speculator"]


class Speculator:
    """Guesses for one generation. ``min_k`` 1 drafts every round the drafter can (``ngram``);
    0 lets the planner stop drafting where it does not pay (``auto``, draft models)."""

    def __init__(self, drafter: Drafter, planner: SpeculationPlanner, *, min_k: int = 0) -> None:
        self.drafter = drafter
        self.planner = planner
        self.min_k = min_k
        self._draft_seconds = 0.0

    @classmethod
    def for_mode(
        cls,
        mode: str,
        *,
        max_k: int = 8,
        fixed_k: int | None = None,
        draft_model: DraftModel | None = None,
    ) -> Speculator | None:
        """The speculator of a `SpeculationConfig` mode (None for ``off``); a draft-model mode
        needs ``draft_model`` loaded."""
        planner = SpeculationPlanner(max_k=max_k, fixed_k=fixed_k)
        if mode == "off":
            return None
        if mode in ("auto", "ngram"):
            return cls(NgramDrafter(), planner, min_k=1 if mode == "ngram" else 0)
        if draft_model is None:
            raise ValueError(f"speculation mode {mode!r} needs its draft model loaded")
        return cls(ModelDrafter(draft_model), planner)

    async def draft(
        self, context: Sequence[int], room: int, sampler: Sampler, first_index: int
    ) -> tuple[int, ...]:
        """Up to ``room`` guesses after ``context`` (prompt and answer so far): as many as the
        planner asks this round, fewer when the drafter finds none."""
        k = min(max(self.planner.choose_k(), self.min_k), room)
        if k <= 0:
            self._draft_seconds = 0.0
            return ()
        started = time.perf_counter()
        if isinstance(self.drafter, ModelDrafter):  # compute: off the event loop
            draft = await trio.to_thread.run_sync(
                self.drafter.propose, list(context), k, sampler, first_index
            )
        else:
            draft = self.drafter.propose(context, k, sampler, first_index)
        self._draft_seconds = time.perf_counter() - started
        return draft.tokens

    def record(
        self, drafted: int, accepted: int, step_seconds: float, *, decode: bool = True
    ) -> None:
        """The round's outcome: ``drafted`` guesses sent, ``accepted`` kept, the step's time
        (``decode`` False: the step also fed a prompt, its time says nothing of guesses)."""
        self.planner.record(drafted, accepted, step_seconds, self._draft_seconds, decode=decode)

    def statistics(self) -> PlannerStatistics:
        return self.planner.statistics()
