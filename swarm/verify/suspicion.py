"""How often to audit a peer: a base rate raised by suspicion, lowered by stake and history.

Suspicion: a new peer (fewer than ``new_peer_audits`` passed audits), any failed audit, an
output whose norm falls outside the running range of its layer range's outputs, an answer
faster than the peer's announced throughput allows. Trust: stake (see `swarm.verify.ledger`)
and a long clean record divide the rate, down to ``min_fraction`` of the base.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from swarm.types import LayerRange
from swarm.verify.reputation import PeerRecord

__all__ = ["NormStats", "SuspicionConfig", "audit_rate", "too_fast"]


@dataclass(frozen=True)
class SuspicionConfig:
    """Knobs of `audit_rate` (defaults in brackets in the field comments)."""

    new_peer_audits: int = 3  # passed audits before a peer stops being "new"
    new_factor: float = 2.0  # rate x this for new peers
    failed_rate: float = 0.5  # at least this rate after any failed audit
    stake_unit: float = 100.0  # each unit of stake halves the rate once more (1 / (1 + s/u))
    clean_unit: int = 50  # each 50 clean audits act like one unit of stake
    min_fraction: float = 0.25  # trust never lowers the rate below base x this
    norm_sigmas: float = 4.0  # log-norm this many standard deviations off = outlier
    norm_min_samples: int = 8
    fast_fraction: float = 0.2  # an answer in < this x announced compute time is suspicious


def audit_rate(
    base: float,
    record: PeerRecord,
    *,
    stake: float = 0.0,
    outlier: bool = False,
    fast: bool = False,
    config: SuspicionConfig = SuspicionConfig(),
) -> float:
    """The probability of auditing one hop of one step, in [0, 1]."""
    if base <= 0.0:
        return 0.0
    if outlier:
        return 1.0
    rate = base
    if record.failed > 0:
        rate = max(rate, config.failed_rate)
    elif record.passed < config.new_peer_audits:
        rate *= config.new_factor
    else:
        trust = 1.0 + stake / config.stake_unit + record.passed / config.clean_unit
        rate = max(base / trust, base * config.min_fraction)
    if fast:
        rate = max(rate, 2 * base)
    return min(rate, 1.0)


def too_fast(seconds: float, tokens: int, throughput: float, fraction: float) -> bool:
    """Whether ``tokens`` came back in less than ``fraction`` of the announced compute time.

    ``seconds`` includes network time, so it can only overstate compute: an honest peer is
    never flagged by this, a peer that skips its work may be.
    """
    if throughput <= 0 or tokens <= 0:
        return False
    return seconds < fraction * tokens / throughput


@dataclass
class _Welford:
    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, x: float) -> None:
        self.n += 1
        d = x - self.mean
        self.mean += d / self.n
        self.m2 += d * (x - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else 0.0


@dataclass
class NormStats:
    """Running statistics of log output norms per layer range (fed with checked outputs)."""

    config: SuspicionConfig = field(default_factory=SuspicionConfig)
    _stats: dict[LayerRange, _Welford] = field(default_factory=dict)

    def observe(self, layers: LayerRange, norm: float) -> None:
        if norm > 0 and math.isfinite(norm):
            self._stats.setdefault(layers, _Welford()).add(math.log(norm))

    def is_outlier(self, layers: LayerRange, norm: float) -> bool:
        """A zero, non-finite, or far-off norm (once enough samples were seen)."""
        if not (norm > 0 and math.isfinite(norm)):
            return True
        stats = self._stats.get(layers)
        if stats is None or stats.n < self.config.norm_min_samples:
            return False
        spread = max(stats.std, 0.05)
        return abs(math.log(norm) - stats.mean) > self.config.norm_sigmas * spread
