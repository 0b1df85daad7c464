"""Choosing how many tokens to draft each round (k), from what was measured.

With acceptance rate a (each drafted token survives with probability a, given the ones before
did), a round of k drafts yields ``expected_tokens(a, k) = (1 - a**(k+1)) / (1 - a)`` tokens.
It costs the chain's step time for 1 + k positions, modelled as ``base + k * extra`` (fitted
to the rounds seen; ``base`` is mostly distance on a wide-area chain, compute on loopback),
plus the drafter's own time per guess. The planner picks the k in 0..max_k with the most
tokens per second, so it drafts long over distance, short when compute dominates, and not at
all when the drafts keep failing.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

__all__ = ["PlannerStatistics", "SpeculationPlanner", "expected_tokens"]


def expected_tokens(acceptance: float, k: int) -> float:
    """Expected tokens out of a round with k drafts at per-token ``acceptance``."""
    if acceptance >= 1.0:
        return float(k + 1)
    return (1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)


@dataclass(frozen=True)
class PlannerStatistics:
    rounds: int
    drafted: int
    accepted: int
    tokens: int  # tokens yielded (accepted drafts + one of the target's per round)
    acceptance: float
    base_seconds: float
    extra_seconds: float


class SpeculationPlanner:
    """Online estimates of acceptance and round cost; `choose_k` before each round and
    `record` after it. ``max_k`` bounds a round; ``fixed_k`` pins it (for tests and
    benchmarks)."""

    def __init__(self, max_k: int = 8, fixed_k: int | None = None, window: int = 32) -> None:
        self.max_k = max_k
        self.fixed_k = fixed_k
        self._accepted = 1.0  # a Beta(1, 1) prior on acceptance
        self._rejected = 1.0
        self._rounds: deque[tuple[int, float]] = deque(maxlen=window)  # (positions - 1, s)
        self._draft_seconds = 0.0  # per guess, exponentially averaged
        self._since_draft = 0  # rounds since the last one that carried guesses
        self.explore_every = 16  # with k at 0, guess once every this many rounds
        self._totals = [0, 0, 0, 0]  # rounds, drafted, accepted, tokens

    @property
    def acceptance(self) -> float:
        return self._accepted / (self._accepted + self._rejected)

    def cost_model(self) -> tuple[float, float]:
        """(base, extra): seconds of a step of one position, and per extra position."""
        if not self._rounds:
            return 0.0, 0.0
        ks = [k for k, _ in self._rounds]
        ts = [t for _, t in self._rounds]
        mean_k, mean_t = sum(ks) / len(ks), sum(ts) / len(ts)
        spread = sum((k - mean_k) ** 2 for k in ks)
        if spread == 0:
            # one round size seen: assume an extra position costs 5 % of a step (a decode
            # step reads the weights once for all its positions) until rounds differ
            extra = 0.05 * mean_t / (1 + 0.05 * mean_k)
        else:
            extra = sum((k - mean_k) * (t - mean_t) for k, t in self._rounds) / spread
            extra = max(extra, 0.0)
        base = max(mean_t - extra * mean_k, 1e-6)
        return base, extra

    def choose_k(self) -> int:
        """How many tokens to draft for the next round (0: a plain step)."""
        if self.fixed_k is not None:
            return self.fixed_k
        if len(self._rounds) < 2:
            return min(2, self.max_k)  # measure a little before trusting the model
        base, extra = self.cost_model()
        a = self.acceptance
        best_k, best_rate = 0, 1.0 / base
        for k in range(1, self.max_k + 1):
            seconds = base + k * (extra + self._draft_seconds)
            rate = expected_tokens(a, k) / seconds
            if rate > best_rate * 1.10:  # a clear gain: guesses that barely pay cost more
                best_k, best_rate = k, rate
        if best_k == 0 and self._since_draft >= self.explore_every:
            return 1  # the estimates may be stale: one cheap guess measures them again
        return best_k

    def record(
        self,
        drafted: int,
        accepted: int,
        step_seconds: float,
        draft_seconds: float = 0.0,
        *,
        decode: bool = True,
    ) -> None:
        """One round: ``drafted`` guesses sent, ``accepted`` kept, the chain's step time and
        the drafter's time. ``decode`` False (a round that also fed a prompt) leaves the cost
        model alone: its time is the prompt's."""
        self._accepted += accepted
        self._rejected += 1 if accepted < drafted else 0
        self._since_draft = 0 if drafted else self._since_draft + 1
        if decode:
            self._rounds.append((drafted, step_seconds))
        if drafted:
            per_guess = draft_seconds / drafted
            self._draft_seconds += 0.3 * (per_guess - self._draft_seconds)
        totals = self._totals
        totals[0] += 1
        totals[1] += drafted
        totals[2] += accepted
        totals[3] += accepted + 1

    def statistics(self) -> PlannerStatistics:
        base, extra = self.cost_model()
        rounds, drafted, accepted, tokens = self._totals
        return PlannerStatistics(rounds, drafted, accepted, tokens, self.acceptance, base, extra)
