"""Who a datagram comes from: source groups, per-group rate limits, and address tokens.

A *source group* is what one party can be assumed to control cheaply: a public IPv4 /24 or
IPv6 /64 (as BitTorrent's BEP 42 and Ethereum's discovery reason). Routing-table caps,
storage fairness and rate limits all count per group, so an identity factory behind one
subnet counts as one party however many node ids or record signers it makes.

Loopback, private and link-local addresses (a LAN, a test on one machine) are grouped as
`PrivateGroups` says (``DHTConfig.admission.private_groups``, ``--private-groups`` on the CLI) for
what a node *stores* and *proves*: by default one group per host (IP), so one machine with
many ports is one party, as a public /24 is; on a LAN every machine has its own address, so
LAN peers stay apart, and only processes sharing one machine (or one NAT address) share a
share. ``endpoint`` (one ``ip:port`` each) suits tests that play many hosts on one
machine; ``subnet`` groups a private /24 or /64 as a public one. Routing-table caps and
request rates for those addresses count per endpoint unless
``DHTConfig.admission.cap_private_addresses`` (a local swarm of many processes must be able to
form).

Groups of groups (`super_group`): a public /16 or /48, the host of an endpoint, the subnet of
a private host. When every group holds its fair part of a full key, the largest group of
groups gives way instead (`swarm.dht.storage`): one /48 holds 65,536 /64s, one host many
ports.

`AddressTokens` proves that a requester receives datagrams at the address it sends from: a
reply hands it an HMAC of (address, node id); a later request that echoes it proves the pair
without our sending anything beyond replies (nothing to amplify toward a forged address).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import time
from collections import OrderedDict
from enum import StrEnum

__all__ = ["AddressTokens", "PrivateGroups", "RateLimiter", "SourceGroups", "super_group"]


class PrivateGroups(StrEnum):
    """How loopback, private and link-local addresses are grouped for storage and proofs."""

    HOST = "host"  # one group per IP: one machine (or one NAT address) is one party
    ENDPOINT = "endpoint"  # one group per ip:port: tests that play many hosts on one machine
    SUBNET = "subnet"  # one group per /24 or /64, as public addresses


_TOKEN_BYTES = 16


class SourceGroups:
    """Maps an address to its IP key and its subnet key (see the module docstring)."""

    _CACHE_SIZE = 65_536

    def __init__(self, cap_private: bool, private: PrivateGroups = PrivateGroups.HOST) -> None:
        self._cap_private = cap_private
        self._private = private
        self._cache: dict[tuple[str, int], tuple[str, str]] = {}
        self._stores: dict[tuple[str, int], str] = {}

    def group(self, ip: str, port: int) -> str:
        """The group that stores and proofs count against (see the module docstring)."""
        found = self._stores.get((ip, port))
        if found is None:
            if len(self._stores) >= self._CACHE_SIZE:
                self._stores.clear()
            found = self._stores[(ip, port)] = self._store_group(ip, port)
        return found

    def _store_group(self, ip: str, port: int) -> str:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return f"{ip}:{port}"
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        private = addr.is_private or addr.is_loopback or addr.is_link_local
        if private and self._private is PrivateGroups.ENDPOINT:
            return f"{addr}:{port}" if addr.version == 4 else f"[{addr}]:{port}"
        if private and self._private is PrivateGroups.HOST:
            return str(addr)
        return _subnet(addr)

    def keys(self, ip: str, port: int) -> tuple[str, str]:
        """(ip key, subnet key) of an address; both are the endpoint for exempt addresses."""
        found = self._cache.get((ip, port))
        if found is None:
            if len(self._cache) >= self._CACHE_SIZE:
                self._cache.clear()
            found = self._cache[(ip, port)] = self._compute(ip, port)
        return found

    def _compute(self, ip: str, port: int) -> tuple[str, str]:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return f"{ip}:{port}", f"{ip}:{port}"
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        private = addr.is_private or addr.is_loopback or addr.is_link_local
        if private and not self._cap_private:
            endpoint = f"{addr}:{port}"
            return endpoint, endpoint
        return str(addr), _subnet(addr)

    def subnet(self, ip: str, port: int) -> str:
        return self.keys(ip, port)[1]


def _subnet(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, wide: bool = False) -> str:
    """The /24 or /64 of ``addr`` (with ``wide``: the /16 or /48)."""
    prefix = (24 if addr.version == 4 else 64) - (8 if wide and addr.version == 4 else 0)
    prefix -= 16 if wide and addr.version == 6 else 0
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


def super_group(group: str) -> str:
    """The group of groups ``group`` (a `SourceGroups.group` key) belongs to: a /24's /16, a
    /64's /48, an endpoint's host, a host's /24 or /64; anything else is its own."""
    try:
        if "/" in group:
            net = ipaddress.ip_network(group, strict=False)
            return _subnet(net.network_address, wide=True)
        if group.count(":") == 1 or group.startswith("["):  # ip:port (IPv4 or [IPv6]:port)
            return group.rsplit(":", 1)[0]
        return _subnet(ipaddress.ip_address(group))
    except ValueError:
        return group


class RateLimiter:
    """Token buckets per key (``rate`` per second, up to ``burst``), for at most ``max_keys``
    keys: the least recently used are forgotten (they start again with a full bucket)."""

    def __init__(self, rate: float, burst: float, max_keys: int = 4096) -> None:
        self._rate = rate
        self._burst = burst
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, key: str, cost: float = 1.0, now: float | None = None) -> bool:
        """Take ``cost`` tokens from ``key``'s bucket; False (and nothing taken) if empty."""
        now = time.monotonic() if now is None else now
        level, last = self._buckets.pop(key, (self._burst, now))
        level = min(self._burst, level + (now - last) * self._rate)
        allowed = level >= cost
        self._buckets[key] = (level - cost if allowed else level, now)
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return allowed


class AddressTokens:
    """Issues and checks tokens bound to (ip, port, node id); a token lives one to two
    ``lifetime`` periods (the secret is per process; tokens do not survive a restart)."""

    def __init__(self, lifetime: float = 300.0) -> None:
        self._secret = os.urandom(32)
        self._lifetime = lifetime

    def _mac(self, epoch: int, ip: str, port: int, node_id: bytes) -> bytes:
        message = f"{epoch}|{ip}|{port}|".encode() + node_id
        return hmac.digest(self._secret, message, "sha256")[:_TOKEN_BYTES]  # one C call

    def issue(self, ip: str, port: int, node_id: bytes, now: float | None = None) -> bytes:
        now = time.time() if now is None else now
        return self._mac(int(now // self._lifetime), ip, port, node_id)

    def check(
        self, token: object, ip: str, port: int, node_id: bytes, now: float | None = None
    ) -> bool:
        """True if ``token`` was issued to this (ip, port, node id) recently."""
        if not isinstance(token, bytes) or len(token) != _TOKEN_BYTES:
            return False
        epoch = int((time.time() if now is None else now) // self._lifetime)
        return any(
            hmac.compare_digest(token, self._mac(e, ip, port, node_id)) for e in (epoch, epoch - 1)
        )
