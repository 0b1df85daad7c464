"""Which drafted tokens the target model accepts.

`accept` is the rule the token loop uses. At every position it draws the target's own token
with the sampler's noise for that answer index (`Sampler.sample`) and keeps the draft while
the two agree; at the first disagreement (or after the last draft) the target's token is the
round's last. The tokens that come out are therefore exactly plain decoding's for the same
seed, whatever was drafted and however long the round was; greedy is the special case where
the target's token is the argmax. The chance that a drafted token survives is p(x) for a
fixed guess (as in the standard rule below, with q a point mass), and for a model drafter
that draws with the same noise it is the Gumbel coupling's P(argmax(log p + g) ==
argmax(log q + g)) >= (1 - TV) / (1 + TV).

`accept_residual` is the textbook rule (Leviathan et al. 2023, Chen et al. 2023): accept x ~ q
with probability min(1, p(x) / q(x)), else draw from the normalised residual max(0, p - q).
It keeps the output distribution the target's and accepts a little more often with model
drafts, but its tokens depend on the round boundaries, so a seed reproduces them only when
the rounds are the same; it is kept as the reference the tests measure `accept` against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from swarm.client.sampling import Sampler

__all__ = ["Verdict", "accept", "accept_residual"]


@dataclass(frozen=True)
class Verdict:
    """The round's outcome: ``tokens`` = the accepted drafts then one token of the target's
    (so ``len(tokens) == accepted + 1``)."""

    tokens: tuple[int, ...]
    accepted: int
    drafted: int


def accept(
    sampler: Sampler, logits: torch.Tensor, draft: Sequence[int], first_index: int
) -> Verdict:
    """Accept a prefix of ``draft`` against the target's ``logits`` (k+1, vocab).

    Row ``i`` holds the target's prediction for the token after the i-th drafted one (row 0:
    after the last accepted token); ``first_index`` is the answer index of row 0's token.
    """
    k = len(draft)
    if logits.shape[0] != k + 1:
        raise ValueError(f"{k} drafted tokens need {k + 1} rows of logits, got {logits.shape[0]}")
    tokens: list[int] = []
    for i in range(k + 1):
        chosen = int(sampler.sample(logits[i : i + 1], first_index + i)[0])
        tokens.append(chosen)
        if i == k or chosen != draft[i]:
            return Verdict(tuple(tokens), i, k)
    raise AssertionError("unreachable")  # the loop returns at i == k


def accept_residual(
    target: torch.Tensor,
    draft: Sequence[int],
    draft_probs: torch.Tensor | None,
    generator: torch.Generator,
) -> Verdict:
    """The standard speculative-sampling rule over target probabilities ``target`` (k+1,
    vocab) and the drafter's ``draft_probs`` (k, vocab; None for a fixed guess, q = one-hot)."""
    k = len(draft)
    tokens: list[int] = []
    for i in range(k):
        x = int(draft[i])
        p = target[i]
        q = (
            draft_probs[i]
            if draft_probs is not None
            else torch.zeros_like(p).index_fill_(0, torch.tensor([x]), 1.0)
        )
        ratio = float(p[x]) / max(float(q[x]), 1e-30)
        if float(torch.rand((), generator=generator)) < min(1.0, ratio):
            tokens.append(x)
            continue
        residual = (p - q).clamp_(min=0.0)
        total = float(residual.sum())
        choice = residual / total if total > 0 else p
        tokens.append(int(torch.multinomial(choice, 1, generator=generator)))
        return Verdict(tuple(tokens), i, k)
    tokens.append(int(torch.multinomial(target[k], 1, generator=generator)))
    return Verdict(tuple(tokens), k, k)
