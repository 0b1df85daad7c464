"""Fair shares of a server among strangers: what one peer, and one address, may hold.

Each authenticated peer may hold ``max_sessions_per_peer`` sessions and ``peer_cache_share``
of the cache; all peers at one host (an IPv4 address or a public IPv6 /64,
`swarm.net.transport.host_key`) together ``max_sessions_per_host`` and
``host_cache_share`` (so a factory of identities behind one address counts as one). These
shares are *soft*: while the server has room, a peer may borrow beyond its share (a gateway
holding many users' sessions is one peer), but what it borrowed is taken back as soon as a
peer within its share needs the room: from the peer most beyond its own share first (its
idlest session first), and from the peers of an address beyond its share only when no peer
is beyond its own. Servers announce `newcomer_room` (free plus reclaimable, up to one
peer's share), so that clients still route to a server whose room is only borrowed. A
session bigger than one peer's cache share is refused outright.

The reclaimed session's client is told ``session`` ("reclaimed") and moves on to another
server without counting it a failure.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from swarm.errors import LimitExceeded
from swarm.types import PeerId

__all__ = ["Holder", "SessionQuotas", "newcomer_room", "plan_admission"]


class Holder(Protocol):
    """What the quotas read of a session."""

    @property
    def client(self) -> PeerId | None: ...

    @property
    def host(self) -> str | None: ...

    @property
    def tokens(self) -> int: ...

    @property
    def last_active(self) -> float: ...


H = TypeVar("H", bound=Holder)


@dataclass(frozen=True)
class SessionQuotas:
    """The numbers `plan_admission` enforces (from `SessionLimits`)."""

    max_sessions: int
    cache_tokens: int
    per_peer_sessions: int
    per_host_sessions: int
    per_peer_tokens: int
    per_host_tokens: int


@dataclass
class _Use:
    sessions: Counter[object]
    tokens: Counter[object]

    @classmethod
    def of(cls, holders: Iterable[Holder], key: str) -> _Use:
        use = cls(Counter(), Counter())
        for h in holders:
            owner = getattr(h, key)
            if owner is not None:
                use.sessions[owner] += 1
                use.tokens[owner] += h.tokens
        return use


def plan_admission(
    quotas: SessionQuotas,
    open_sessions: Sequence[H],
    client: PeerId | None,
    host: str | None,
    need: int,
) -> list[H]:
    """The sessions to reclaim (possibly none) so that a new session of ``need`` cache tokens
    from ``client`` at ``host`` fits. Raises `LimitExceeded` naming the limit when it cannot:
    the server is full and the newcomer is itself beyond its share, or reclaiming borrowed
    room would not be enough.

    Whom it reclaims: see `_borrowed` (the peer most over its own share first)."""
    if need > quotas.per_peer_tokens:
        raise LimitExceeded(
            f"session needs {need} cache tokens; at most {quotas.per_peer_tokens} per peer"
        )
    peers, hosts = _Use.of(open_sessions, "client"), _Use.of(open_sessions, "host")
    within = _within(quotas, peers, hosts, client, host, need)
    sessions = len(open_sessions)
    free = quotas.cache_tokens - sum(h.tokens for h in open_sessions)
    if sessions < quotas.max_sessions and need <= free:
        return []  # room enough: open, borrowing beyond the share if need be
    if within is not None:
        raise LimitExceeded(f"server is full and {within}")
    victims: list[H] = []
    left = list(open_sessions)
    while sessions >= quotas.max_sessions or need > free:
        # shares are counted again after each reclaim: nobody loses a session within its share
        peers, hosts = _Use.of(left, "client"), _Use.of(left, "host")
        candidates = _borrowed(quotas, left, peers, hosts)
        if not candidates:
            raise LimitExceeded(
                f"server is full ({sessions} of {quotas.max_sessions} sessions, {free} of "
                f"{quotas.cache_tokens} cache tokens free) and nobody holds beyond its share"
            )
        victim = candidates[0]
        victims.append(victim)
        left.remove(victim)
        sessions, free = sessions - 1, free + victim.tokens
    return victims


def _within(
    q: SessionQuotas, peers: _Use, hosts: _Use, client: PeerId | None, host: str | None, need: int
) -> str | None:
    """None when the newcomer stays within its shares, else which share it would pass."""
    if client is not None and peers.sessions[client] >= q.per_peer_sessions:
        return f"this peer holds its {q.per_peer_sessions} sessions already"
    if host is not None and hosts.sessions[host] >= q.per_host_sessions:
        return f"this address holds its {q.per_host_sessions} sessions already"
    if client is not None and peers.tokens[client] + need > q.per_peer_tokens:
        return f"this peer would pass its {q.per_peer_tokens} cache tokens"
    if host is not None and hosts.tokens[host] + need > q.per_host_tokens:
        return f"this address would pass its {q.per_host_tokens} cache tokens"
    return None


def _borrowed(q: SessionQuotas, holders: Sequence[H], peers: _Use, hosts: _Use) -> list[H]:
    """Sessions that may be reclaimed, in the order to take them: first those of peers
    beyond their *own* share, the peer most over first, each peer's idlest first; only when
    no peer is beyond its own share, those at an address beyond its share, the address
    most over first and within it the peer holding most there, idlest first. A peer within
    its share is never reclaimed while a peer beyond its own share holds room, whoever
    shares its address (an idle chat beside busy identities at one address is not the one
    taken)."""

    def peer_excess(client: PeerId | None) -> float:
        if client is None:
            return 0.0
        return max(
            peers.sessions[client] / q.per_peer_sessions,
            peers.tokens[client] / max(q.per_peer_tokens, 1),
        )

    def host_excess(host: str | None) -> float:
        if host is None:
            return 0.0
        return max(
            hosts.sessions[host] / q.per_host_sessions,
            hosts.tokens[host] / max(q.per_host_tokens, 1),
        )

    over_peers = [h for h in holders if peer_excess(h.client) > 1.0]
    if over_peers:
        over_peers.sort(key=lambda h: (-peer_excess(h.client), h.last_active))
        return over_peers
    over_hosts = [h for h in holders if host_excess(h.host) > 1.0]
    over_hosts.sort(
        key=lambda h: (
            -host_excess(h.host),
            -(peers.tokens[h.client] if h.client is not None else 0),
            -(peers.sessions[h.client] if h.client is not None else 0),
            h.last_active,
        )
    )
    return over_hosts


def newcomer_room(quotas: SessionQuotas, open_sessions: Sequence[Holder]) -> int:
    """Cache tokens a newcomer (a peer at a new address, within its share) could get now:
    what is free plus what reclaiming borrowed room would free, at most one peer's share.
    0 when no session could open (every session slot taken and nobody beyond a share).
    Servers announce it, so that borrowed room does not look like no room."""
    left = list(open_sessions)
    free = quotas.cache_tokens - sum(h.tokens for h in left)
    slots = quotas.max_sessions - len(left)
    while free < quotas.per_peer_tokens or slots < 1:
        peers, hosts = _Use.of(left, "client"), _Use.of(left, "host")
        candidates = _borrowed(quotas, left, peers, hosts)
        if not candidates:
            break
        victim = candidates[0]
        left.remove(victim)
        free, slots = free + victim.tokens, slots + 1
    if slots < 1:
        return 0
    return max(0, min(free, quotas.per_peer_tokens))
