"""Stake: a `Ledger` says how much a peer has at stake and takes it when a lie is proven.

`FileLedger` is for private swarms run by one operator: a JSON file ``{peer: stake}`` that the
operator edits, and that slashing rewrites (with the evidence digest in a ``slashed`` list).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol

from swarm.errors import ConfigError
from swarm.types import PeerId

__all__ = ["FileLedger", "Ledger"]


class Ledger(Protocol):
    def stake_of(self, peer: PeerId) -> float:
        """The peer's stake (0 for unknown peers)."""
        ...

    def slash(self, peer: PeerId, evidence: str, fraction: float = 1.0) -> float:
        """Take ``fraction`` of the peer's stake for the evidence (digest); returns the amount."""
        ...


class FileLedger:
    """A `Ledger` in a JSON file: ``{"stakes": {peer: amount}, "slashed": [...]}``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self._stakes: dict[str, float] = {}
        self._slashed: list[dict[str, object]] = []
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                self._stakes = {str(k): float(v) for k, v in data.get("stakes", {}).items()}
                self._slashed = list(data.get("slashed", []))
            except (ValueError, TypeError, AttributeError) as exc:
                raise ConfigError(f"ledger {self.path} is not valid: {exc}") from exc

    def stake_of(self, peer: PeerId) -> float:
        return self._stakes.get(str(peer), 0.0)

    def deposit(self, peer: PeerId, amount: float) -> None:
        """Add stake (the operator's tool); saves the file."""
        if amount < 0:
            raise ConfigError("a deposit is not negative")
        self._stakes[str(peer)] = self.stake_of(peer) + amount
        self._save()

    def slash(self, peer: PeerId, evidence: str, fraction: float = 1.0) -> float:
        """Take the stake once per evidence digest (a replayed evidence slashes nothing)."""
        if any(s.get("evidence") == evidence for s in self._slashed):
            return 0.0
        amount = self.stake_of(peer) * min(max(fraction, 0.0), 1.0)
        self._stakes[str(peer)] = self.stake_of(peer) - amount
        self._slashed.append({"peer": str(peer), "evidence": evidence, "amount": amount})
        self._save()
        return amount

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"stakes": self._stakes, "slashed": self._slashed}, indent=1))
        os.replace(tmp, self.path)
