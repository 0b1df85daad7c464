"""`DHTConfig`: every knob of a DHT node, one frozen value built by the caller and passed whole."""

from __future__ import annotations

from dataclasses import dataclass

from swarm.errors import ConfigError
from swarm.types import parse_address

__all__ = ["MAX_DATAGRAM_BYTES", "DHTConfig"]

# The largest UDP payload we send. Loopback and most paths carry up to 65,507 bytes (with IP
# fragmentation); we keep a margin for the datagram header and the encryption overhead.
MAX_DATAGRAM_BYTES = 60_000
# rpcudp refuses requests whose packed arguments exceed 8 KiB; a store carries one record.
_MAX_REQUEST_RECORD_BYTES = 7_000


@dataclass(frozen=True)
class DHTConfig:
    """Settings of one DHT node.

    - ``host``/``port``: where the UDP socket listens (port 0 picks a free port).
    - ``initial_peers``: ``"host:port"`` of any DHT nodes to bootstrap from (hostnames are
      resolved); empty for the first node of a swarm.
    - ``swarm_key``: 32-byte private-swarm key; with it every datagram is authenticated and
      encrypted, and datagrams from nodes without it are dropped.
    - ``max_records_per_key``: records one key holds; beyond it the freshest are kept. Together
      with ``max_record_bytes`` this keeps a reply inside one datagram.
    - ``max_record_bytes``: the largest encoded, signed record (``announce`` raises beyond it).
    - ``max_ttl``: storing nodes refuse records that expire further ahead than this.
    - ``clock_skew``: how far peers' wall clocks may disagree (seconds). A record whose expiry
      is past ``now`` is expired; one expiring after ``now + max_ttl + clock_skew`` is refused.
    - ``rpc_timeout``: seconds to wait for one UDP reply.
    - ``bootstrap_timeout``: deadline for joining through ``initial_peers``.
    - ``evict_after_failures``: consecutive unanswered RPCs before a contact leaves the routing
      table (stock kademlia evicts after one, which loses live peers on a single lost packet).
    - ``announce_concurrency``: announces one node runs at once (UDP buffers overflow when
      hundreds of writers store at the same moment).
    - ``get_quorum``: a lookup stops once this many nodes answered with records (or all of the
      k closest were asked); their records are merged.
    - ``ksize``/``alpha``: Kademlia's k and alpha.
    - ``refresh_interval``: seconds between routing-table refreshes.
    """

    host: str = "127.0.0.1"
    port: int = 0
    initial_peers: tuple[str, ...] = ()
    swarm_key: bytes | None = None
    max_records_per_key: int = 40
    max_record_bytes: int = 1_200
    max_ttl: float = 24 * 3600.0
    clock_skew: float = 30.0
    rpc_timeout: float = 2.0
    bootstrap_timeout: float = 10.0
    evict_after_failures: int = 2
    announce_concurrency: int = 16
    get_quorum: int = 3
    ksize: int = 20
    alpha: int = 3
    refresh_interval: float = 3600.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"DHT port {self.port} is outside 0..65535")
        for peer in self.initial_peers:
            parse_address(peer)
        if self.swarm_key is not None and len(self.swarm_key) != 32:
            raise ConfigError(f"swarm key holds {len(self.swarm_key)} bytes; expected 32")
        if not 0 < self.max_record_bytes <= _MAX_REQUEST_RECORD_BYTES:
            raise ConfigError(f"max_record_bytes must be in 1..{_MAX_REQUEST_RECORD_BYTES}")
        if self.max_records_per_key < 1:
            raise ConfigError("max_records_per_key must be at least 1")
        if self.max_records_per_key * (self.max_record_bytes + 8) + 1024 > MAX_DATAGRAM_BYTES:
            raise ConfigError(
                f"{self.max_records_per_key} records of {self.max_record_bytes} bytes do not fit "
                f"one {MAX_DATAGRAM_BYTES}-byte datagram; lower max_records_per_key"
            )
        positive = {
            "max_ttl": self.max_ttl,
            "rpc_timeout": self.rpc_timeout,
            "bootstrap_timeout": self.bootstrap_timeout,
            "refresh_interval": self.refresh_interval,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ConfigError(f"DHTConfig.{name} must be positive, got {value}")
        counts = {
            "evict_after_failures": self.evict_after_failures,
            "announce_concurrency": self.announce_concurrency,
            "get_quorum": self.get_quorum,
            "ksize": self.ksize,
            "alpha": self.alpha,
        }
        for name, count in counts.items():
            if count < 1:
                raise ConfigError(f"DHTConfig.{name} must be at least 1, got {count}")
        if self.clock_skew < 0:
            raise ConfigError("DHTConfig.clock_skew must not be negative")
