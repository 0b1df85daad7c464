"""`Reputation`: what a client remembers about peers across runs (audits, bans, evidence).

Stored as JSON (default ``~/.cache/swarm/reputation.json``; tests pass a tmp path)::

    {"version": 1, "peers": {"<peer id base58>": {"passed": 12, "failed": 1, "bans": 1,
      "banned_until": 1730000000.0, "first_seen": 1729990000.0, "evidence": ["<sha256>"]}}}

A ban lasts ``ban_base_s * 2 ** (bans - 1)`` seconds (capped at ``ban_max_s``) and then decays
on its own; a new proven lie renews it (longer). Times are wall-clock seconds (``time.time``)
so bans survive restarts. Readers (``swarm status``) use `Reputation.load`, `records` and
`is_banned`; nothing here talks to the network.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from swarm.types import PeerId

__all__ = ["DEFAULT_REPUTATION_PATH", "PeerRecord", "Reputation", "ban_length"]

log = logging.getLogger(__name__)

DEFAULT_REPUTATION_PATH = Path("~/.cache/swarm/reputation.json")


def ban_length(bans: int, base_s: float, factor: float, max_s: float) -> float:
    """Seconds the ``bans``-th ban of a peer lasts: ``min(base_s * factor**(bans-1), max_s)``.

    The one backoff formula of swarm: failure bans (`swarm.client.bans`) and proven-lie bans
    (`Reputation`) both use it.
    """
    return float(min(base_s * factor ** max(bans - 1, 0), max_s))


@dataclass
class PeerRecord:
    """One peer's history as seen by this client."""

    passed: int = 0
    failed: int = 0
    bans: int = 0
    banned_until: float = 0.0
    first_seen: float = 0.0
    evidence: list[str] = field(default_factory=list)  # sha256 hex of evidence records


class Reputation:
    """Per-peer audits and bans; `save` writes the file atomically."""

    def __init__(
        self,
        path: Path | None = None,
        *,
        ban_base_s: float = 3600.0,
        ban_max_s: float = 30 * 86400.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.ban_base_s = ban_base_s
        self.ban_max_s = ban_max_s
        self._clock = clock
        self._peers: dict[PeerId, PeerRecord] = {}

    @classmethod
    def load(cls, path: str | Path | None = None, **kwargs: object) -> Reputation:
        """Read ``path`` (default `DEFAULT_REPUTATION_PATH`); a missing file is empty.

        A corrupt file is logged and ignored (reputation is advice, never a reason to stop).
        """
        file = Path(path or DEFAULT_REPUTATION_PATH).expanduser()
        rep = cls(file, **kwargs)  # type: ignore[arg-type]
        try:
            data = json.loads(file.read_text())
            for key, value in data["peers"].items():
                rec = PeerRecord(**value)
                rep._peers[PeerId.from_string(key)] = rec
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError, OSError) as exc:
            log.warning("ignoring unreadable reputation file %s: %s", file, exc)
            rep._peers.clear()
        return rep

    def save(self) -> None:
        """Write the file (no-op without a path). Raises `OSError` if it cannot be written."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"version": 1, "peers": {str(p): asdict(r) for p, r in self._peers.items()}}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)

    def record(self, peer: PeerId) -> PeerRecord:
        """The peer's record (created, with ``first_seen`` now, if new)."""
        rec = self._peers.get(peer)
        if rec is None:
            rec = self._peers[peer] = PeerRecord(first_seen=self._clock())
        return rec

    def records(self) -> dict[PeerId, PeerRecord]:
        """Every known peer's record (a copy of the mapping; records are live)."""
        return dict(self._peers)

    def record_audit(self, peer: PeerId, passed: bool) -> None:
        rec = self.record(peer)
        if passed:
            rec.passed += 1
        else:
            rec.failed += 1

    def ban(self, peer: PeerId, evidence: str | None = None) -> float:
        """Ban (or renew the ban of) ``peer``; returns the ban's length in seconds."""
        rec = self.record(peer)
        rec.bans += 1
        length = ban_length(rec.bans, self.ban_base_s, 2.0, self.ban_max_s)
        rec.banned_until = max(rec.banned_until, self._clock() + length)
        if evidence is not None and evidence not in rec.evidence:
            rec.evidence.append(evidence)
        return length

    def is_banned(self, peer: PeerId) -> bool:
        rec = self._peers.get(peer)
        return rec is not None and rec.banned_until > self._clock()

    def banned(self) -> set[PeerId]:
        """Peers whose ban has not decayed yet."""
        now = self._clock()
        return {p for p, r in self._peers.items() if r.banned_until > now}
