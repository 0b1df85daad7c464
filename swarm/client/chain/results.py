"""What one step of a `Chain` returns: `StepResult`, and per hop a `HopStep`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from swarm.client.chain.hop import HistoryView
from swarm.client.routing import Hop
from swarm.net.messages import Receipt

__all__ = ["HopStep", "StepResult"]


@dataclass(frozen=True)
class HopStep:
    """One hop's part in one step: what it was sent, what it answered, its receipt and time,
    and its history up to this step (concatenated only when asked, see `HistoryView`)."""

    hop: Hop
    input: torch.Tensor  # (batch, n, hidden), in the wire dtype
    positions: torch.Tensor  # (batch, n)
    output: torch.Tensor  # (batch, n, hidden), as the server sent it
    receipt: Receipt | None  # the server's signed receipt for this step
    seconds: float  # from the start of the hop's wait to its answer
    history: HistoryView  # every entry of this hop up to and including this step

    @property
    def new_tokens(self) -> int:
        return int(self.input.shape[1])


@dataclass(frozen=True)
class StepResult:
    """One step through a chain: the last hop's ``output`` ``(batch, n, hidden)`` float32, one
    row per new position of ``positions`` ``(batch, n)``, and every hop of the route as it
    stood when the step ended (a hop replaced during the step appears as its replacement)."""

    step: int
    output: torch.Tensor  # (batch, n, hidden) float32
    positions: torch.Tensor  # (batch, n)
    hops: tuple[HopStep, ...]
    recoveries: int  # the chain's recoveries so far
    keep: int | None = None  # the cache tokens kept before the step (speculative decoding)

    @property
    def route(self) -> list[Hop]:
        return [h.hop for h in self.hops]

    @property
    def receipts(self) -> list[Receipt]:
        """The hops' signed receipts of this step, in route order (those that sent one)."""
        return [h.receipt for h in self.hops if h.receipt is not None]

    @property
    def new_tokens(self) -> int:
        return int(self.positions.shape[1])
