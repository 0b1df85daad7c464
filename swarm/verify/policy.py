"""Verification policies, chosen per client and parsed from strings.

=================  ==========================================================================
``none``           trust every peer
``spot-check:P``   each step, each hop is re-run on a second peer with probability P (raised
                   for suspicious peers); a third peer breaks a tie
``redundant:K``    every step, every hop is re-run on K-1 more peers; majority vote
``optimistic``     accept at once; before the generation returns, a challenger re-runs each
                   hop over the whole session in one forward; a proven lie rolls back
=================  ==========================================================================
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from swarm.errors import ConfigError

__all__ = ["PolicyKind", "VerifyPolicy", "parse_policy"]


class PolicyKind(enum.StrEnum):
    NONE = "none"
    SPOT_CHECK = "spot-check"
    REDUNDANT = "redundant"
    OPTIMISTIC = "optimistic"


@dataclass(frozen=True)
class VerifyPolicy:
    """A parsed policy: ``kind``, the base audit ``rate`` (spot-check) and ``replicas`` (k)."""

    kind: PolicyKind = PolicyKind.NONE
    rate: float = 0.0
    replicas: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ConfigError(f"spot-check rate must be in [0, 1], got {self.rate}")
        if self.replicas < 1:
            raise ConfigError(f"redundant needs k >= 1, got {self.replicas}")

    @property
    def checks_steps(self) -> bool:
        """Whether hops are checked while generating (spot-check, redundant)."""
        return self.kind in (PolicyKind.SPOT_CHECK, PolicyKind.REDUNDANT)

    @property
    def checks_receipts(self) -> bool:
        """Whether step receipts are checked (a hash and a signature each): any real policy."""
        return self.kind is not PolicyKind.NONE

    def __str__(self) -> str:
        if self.kind is PolicyKind.SPOT_CHECK:
            return f"spot-check:{self.rate:g}"
        if self.kind is PolicyKind.REDUNDANT:
            return f"redundant:{self.replicas}"
        return self.kind.value


def parse_policy(text: str | VerifyPolicy | None) -> VerifyPolicy:
    """``"none"``, ``"spot-check:0.1"``, ``"redundant:3"``, ``"optimistic"`` (or None = none).

    Raises `ConfigError` naming the accepted forms.
    """
    if isinstance(text, VerifyPolicy):
        return text
    if text is None:
        return VerifyPolicy()
    kind, _, arg = text.strip().partition(":")
    try:
        if kind == "none" and not arg:
            return VerifyPolicy()
        if kind == "optimistic" and not arg:
            return VerifyPolicy(PolicyKind.OPTIMISTIC)
        if kind == "spot-check":
            return VerifyPolicy(PolicyKind.SPOT_CHECK, rate=float(arg))
        if kind == "redundant":
            return VerifyPolicy(PolicyKind.REDUNDANT, replicas=int(arg))
    except ValueError as exc:
        raise ConfigError(f"bad verification policy {text!r}: {exc}") from exc
    raise ConfigError(
        f"unknown verification policy {text!r}; use none, spot-check:P, redundant:K or optimistic"
    )
