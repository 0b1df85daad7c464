"""`FailurePolicy`: what a chain does about a server that failed it, in one place.

- A server that failed (an error, a broken stream, a missed deadline) is banned from routes
  for a while, backing off on repeat failures (`BanList`).
- A server that only said it cannot go on (full, draining, or our session expired: a
  *blameless* answer) did nothing wrong: it is penalised in routing and avoided by the caller
  where it re-plans, not banned.
- A server that lost a hedged step (late, not failed) is penalised in routing, not banned.
- A relayed server whose path broke in transport (its relay may have gone; the server then
  re-attaches elsewhere and re-announces) is not banned the first `_PATH_RETRIES` times:
  the next plan waits (doubling from `_PATH_RETRY_WAIT_S`) and reads the DHT afresh.

Bans and penalties are shared by every chain of a client (the `BanList`); the failures this
chain banned for are its own (``failures``).
"""

from __future__ import annotations

import logging

from swarm.client.bans import BanList
from swarm.client.chain.hop import HopFailure
from swarm.client.config import ClientConfig
from swarm.errors import ErrorCode, RemoteError, TransportError
from swarm.types import PeerId

__all__ = ["FailurePolicy"]

log = logging.getLogger(__name__)

# What a server answers when it did nothing wrong: full, draining, or our session is gone.
_BLAMELESS = frozenset({ErrorCode.LIMIT_EXCEEDED, ErrorCode.UNAVAILABLE, ErrorCode.SESSION})
# (the server's re-announcement takes a DHT store that may first wait out the dead relay's
# DHT node: 0.5 + 1 + 2 + 4 s at most before the hop is banned like a dead one)
_PATH_RETRIES = 4
_PATH_RETRY_WAIT_S = 0.5


class FailurePolicy:
    """Bans, penalties and the list of failures of one chain (bans shared through ``bans``)."""

    def __init__(self, config: ClientConfig, bans: BanList) -> None:
        self.config = config
        self.bans = bans
        self.failures: list[str] = []
        self._lost_paths: dict[PeerId, int] = {}
        self._refresh_wait = 0.0  # > 0: a relayed path broke; wait, then ask the DHT again

    def blameless(self, failure: HopFailure) -> bool:
        """True when the server only said it is full, draining or done with our session (a
        `LimitExceeded`, ``unavailable`` or ``session`` answer): it is then penalised in
        routing, not banned."""
        cause = failure.cause
        innocent = isinstance(cause, RemoteError) and cause.code in _BLAMELESS
        if innocent:
            peer = failure.hop.server.peer_id
            cfg = self.config
            self.bans.penalties.penalise(
                peer, cfg.hedging.slow_penalty, cfg.hedging.slow_penalty_half_life_s
            )
            log.info("%s cannot go on (%s); moving to another server", peer, cause)
        return innocent

    def ban(self, failure: HopFailure) -> bool:
        """Ban the failed server (backing off) and return True; a `blameless` one is only
        penalised, and False returned (the caller then avoids it where it re-plans)."""
        if self.blameless(failure):
            return False
        if self._path_lost(failure):
            return True  # not banned: the next plan reads its new relays from the DHT
        seconds = self.bans.ban(failure.hop.server.peer_id)
        self.failures.append(str(failure))
        log.warning("banning %s for %.0f s: %s", failure.hop.server.peer_id, seconds, failure)
        return True

    def _path_lost(self, failure: HopFailure) -> bool:
        server = failure.hop.server
        if not server.relays or not isinstance(failure.cause, TransportError):
            return False
        tries = self._lost_paths.get(server.peer_id, 0) + 1
        if tries > _PATH_RETRIES:
            return False
        self._lost_paths[server.peer_id] = tries
        self._refresh_wait = _PATH_RETRY_WAIT_S * 2 ** (tries - 1)
        log.info("the relayed path to %s broke (%s); asking for its relays again",
                 server.peer_id, failure.cause)  # fmt: skip
        return True

    def take_refresh_wait(self) -> float:
        """Seconds the next plan should wait before it reads the directory afresh (a
        relayed path broke), or 0; asking clears it."""
        wait, self._refresh_wait = self._refresh_wait, 0.0
        return wait

    def slow(self, peer: PeerId) -> None:
        """``peer`` lost a hedged step: routes through it cost more for a while."""
        config = self.config
        if config.hedging.slow_penalty > 0:
            value = self.bans.penalties.penalise(
                peer, config.hedging.slow_penalty, config.hedging.slow_penalty_half_life_s
            )
            log.info("penalising %s (route cost x%.2f) for a lost hedged step", peer, 1 + value)
