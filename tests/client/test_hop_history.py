"""A hop's history: its positions, cut back to an accepted length, and its tensors."""

from __future__ import annotations

import pytest
import torch

from swarm.client.chain.hop import HopHistory, StepAnswer
from swarm.errors import SessionError


def _record(history: HopHistory, start: int, n: int) -> None:
    x = torch.arange(start, start + n, dtype=torch.float32).view(1, n, 1).expand(1, n, 4)
    positions = torch.arange(start, start + n).view(1, n)
    history.record(x, positions, StepAnswer(-x, None, 0.01))


def test_positions_cuts_and_tensors_stay_consistent() -> None:
    """`tokens` counts the positions held as entries are recorded and the last one is cut
    back (speculative decoding); `tensors` gives the first entries' positions exactly."""
    history = HopHistory()
    assert history.tokens == 0
    _record(history, 0, 5)  # a prompt
    _record(history, 5, 3)  # a step with two guesses
    assert history.tokens == 8
    x, pos, out = history.tensors(2)
    assert pos.tolist() == [list(range(8))] and torch.equal(out, -x)
    history.truncate(6)  # one guess rejected: the last entry keeps one of its three
    assert history.tokens == 6 and len(history) == 2
    x, pos, _ = history.tensors(2)
    assert pos.tolist() == [list(range(6))] and x.shape == (1, 6, 4)
    assert history.tensors(1)[1].tolist() == [list(range(5))]
    _record(history, 6, 2)
    assert history.tokens == 8
    history.truncate(6)  # the whole last entry goes
    assert history.tokens == 6 and len(history) == 2
    assert history.tensors(2)[1].tolist() == [list(range(6))]
    with pytest.raises(SessionError):
        history.truncate(4)  # before the last entry
    history.truncate(6)  # nothing to cut
    assert history.tokens == 6
