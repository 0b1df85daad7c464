"""The policy of hole punching (`swarm.net.punch`): who may ask for one, what a punch
dials, and when a peer that could not be punched is tried again.

A hole punch makes its answerer bind a port and dial out, and its initiator dial what the
answer names. Left open, that is a reflection vector (name a third party's address and have
a peer knock on its door) and a cheap flood (ask again and again). So:

- the answerer (a relayed peer) answers only over a relayed channel whose relay named the
  caller's address, and dials only that address, at the ports the caller named
  (`punch_targets`; the caller's own LAN addresses only when it comes from our own public
  address, behind the same NAT); it rations punches per caller `PeerId`, per caller host
  and per address group of the caller (`PunchAdmission`), and runs a few at once;
- the initiator dials at most two of the addresses the answer names, no loopback or private
  address unless it is on one itself (`initiator_targets`), and within a per-address-group
  budget shared by all its punches (`PunchAdmission.may_dial`); the handshake on the direct
  socket checks the `PeerId` asked for, on both sides;
- a peer whose upgrade failed is not tried again for a while, doubling with each failure
  (`PunchBackoff`).

A connect is one SYN (a refused one is retried a few times within the window): what a
punch can make us send is a few packets to one host, a few times a minute per host.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from swarm.net.quota import TokenBuckets
from swarm.net.transport import address_group, host_key
from swarm.types import PeerId

__all__ = [
    "PunchAdmission",
    "PunchBackoff",
    "initiator_targets",
    "punch_targets",
]

Address = tuple[str, int]


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.split("/")[0])
    except ValueError:
        return None


def _is_local(host: str) -> bool:
    addr = _ip(host)
    return addr is not None and (addr.is_private or addr.is_loopback or addr.is_link_local)


def punch_targets(
    named: Sequence[Address], observed: str, ours: Iterable[str], limit: int = 2
) -> list[Address]:
    """What a relayed peer dials for a caller its relay saw at ``observed`` (a `host_key`),
    of the addresses the caller ``named``: ``observed`` itself at each named port (an IPv6
    caller: the named addresses inside its /64), at most ``limit`` ports; and, only when the
    caller comes from one of ``ours`` (the addresses our relays see us at: behind the same
    NAT), at most ``limit`` private addresses it named. Never anyone else's address."""
    out: list[Address] = []
    addr = _ip(observed)
    if addr is not None and addr.version == 4:
        ports = list(dict.fromkeys(port for _host, port in named))[:limit]
        out = [(observed, port) for port in ports]
    else:
        out = [(h, p) for h, p in dict.fromkeys(named) if host_key(h) == observed][:limit]
    if observed in set(ours):  # one NAT in front of both of us: its LAN address is reachable
        lan = [(h, p) for h, p in dict.fromkeys(named) if _is_local(h) and (h, p) not in out]
        out += lan[:limit]
    return out


def initiator_targets(named: Sequence[Address], local_host: str, limit: int = 2) -> list[Address]:
    """What an initiator bound at ``local_host`` (its interface towards the relay) dials of
    the addresses the relayed peer ``named``: at most ``limit``, distinct; a loopback one
    only when ``local_host`` is loopback, a private or link-local one only when
    ``local_host`` is not public (we are on a LAN too); never an unspecified, multicast or
    reserved address, nor a port below 1024."""
    ours = _ip(local_host)
    out: list[Address] = []
    for host, port in dict.fromkeys(named):
        addr = _ip(host)
        if addr is None or port < 1024:
            continue
        if addr.is_unspecified or addr.is_multicast or addr.is_reserved:
            continue
        if addr.is_loopback and not (ours is not None and ours.is_loopback):
            continue
        if (addr.is_private or addr.is_link_local) and not _is_local(local_host):
            continue
        out.append((host, port))
        if len(out) >= limit:
            break
    return out


class PunchAdmission:
    """Rations hole punches: per `PeerId` (``peer_rate`` per second after ``peer_burst``),
    per host (``host_rate`` / ``host_burst``) and per address group (``group_rate`` /
    ``group_burst``, `address_group`). `admit` is the answerer's check of a caller; `may_dial`
    the initiator's of a host it is about to dial (its group's bucket). Each bucket table
    keeps at most 16 384 keys (the least recently charged are forgotten)."""

    def __init__(
        self,
        *,
        peer_rate: float,
        peer_burst: float,
        host_rate: float,
        host_burst: float,
        group_rate: float,
        group_burst: float,
    ) -> None:
        self._peers = TokenBuckets(peer_rate, peer_burst)
        self._hosts = TokenBuckets(host_rate, host_burst)
        self._groups = TokenBuckets(group_rate, group_burst)

    def admit(self, peer: PeerId, host: str) -> str | None:
        """None to answer a punch from ``peer`` seen at ``host``, else why not (a safe
        message). A refusal takes no token from the buckets not yet checked."""
        if not self._groups.try_take(address_group(host), 1.0):
            return "too many hole punches from this address group"
        if not self._hosts.try_take(host_key(host), 1.0):
            return "too many hole punches from this host"
        if not self._peers.try_take(peer, 1.0):
            return "too many hole punches from this peer"
        return None

    def may_dial(self, host: str) -> bool:
        """Whether a punch may dial ``host`` now (one token of its address group)."""
        return self._groups.try_take(address_group(host), 1.0)


class PunchBackoff:
    """Peers whose direct upgrade failed, and when each may be tried again: ``base``
    seconds after a first failure, doubling with each further one up to ``cap``; a success
    forgets the peer. At most ``max_peers`` are remembered (the longest-known first go)."""

    def __init__(self, base: float, cap: float, max_peers: int = 4096) -> None:
        self.base = base
        self.cap = max(cap, base)
        self.max_peers = max_peers
        self._until: OrderedDict[PeerId, tuple[float, int]] = OrderedDict()

    def allowed(self, peer: PeerId, now: float) -> bool:
        """Whether an upgrade to ``peer`` may be tried at ``now``."""
        entry = self._until.get(peer)
        return entry is None or now >= entry[0]

    def failures(self, peer: PeerId) -> int:
        """Failed upgrades to ``peer`` in a row (0: none remembered)."""
        entry = self._until.get(peer)
        return 0 if entry is None else entry[1]

    def failed(self, peer: PeerId, now: float) -> float:
        """Count a failed upgrade to ``peer`` at ``now``; returns the wait before the next."""
        failures = self.failures(peer) + 1
        wait = min(self.base * 2.0 ** (failures - 1), self.cap)
        self._until[peer] = (now + wait, failures)
        self._until.move_to_end(peer)
        while len(self._until) > self.max_peers:
            self._until.popitem(last=False)
        return wait

    def succeeded(self, peer: PeerId) -> None:
        self._until.pop(peer, None)

    def __len__(self) -> int:
        return len(self._until)
