"""swarm.client.chain: one object owns a generation's chain of hops (DESIGN §7).

`Chain` opens a route, steps through it (`Chain.step` returns a `StepResult`), hedges late
hops, replaces failed ones (open, replay, splice, rewire pushes) and applies the failure
policy (`FailurePolicy`) in one place.
"""

from swarm.client.chain.chain import Chain, ChainStatistics
from swarm.client.chain.failures import FailurePolicy
from swarm.client.chain.hedging import HedgeRecord, HedgeWinner, hedge_deadline, usual_seconds
from swarm.client.chain.hop import HistoryView, HopFailure, HopHistory, HopState
from swarm.client.chain.results import HopStep, StepResult

__all__ = [
    "Chain",
    "ChainStatistics",
    "FailurePolicy",
    "HedgeRecord",
    "HedgeWinner",
    "HistoryView",
    "HopFailure",
    "HopHistory",
    "HopState",
    "HopStep",
    "StepResult",
    "hedge_deadline",
    "usual_seconds",
]
