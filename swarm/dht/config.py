"""`DHTConfig`: every knob of a DHT node, one frozen value built by the caller and passed whole."""

from __future__ import annotations

from dataclasses import dataclass

from swarm.dht.sources import PrivateGroups
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
    - ``client_only``: join as a client: ask and store, but tell others (a flag in every
      request) not to add us to their routing tables and not to hand us records. Short-lived
      processes (``generate``, ``status``, the gateway's lookups) set it, so their coming and
      going leaves no dead contacts behind.
    - ``max_records_per_key``: records one key holds. When it is full, a record from a new
      signer takes the place of one from the source group (see `swarm.dht.sources`) holding
      the most records of that key, if that group holds at least two more than the newcomer's;
      otherwise it is refused. Together with ``max_record_bytes`` this keeps a reply inside one
      datagram.
    - ``max_record_bytes``: the largest encoded, signed record (``announce`` raises beyond it).
    - ``max_ttl``: storing nodes refuse records that expire further ahead than this (600 s:
      announcers re-announce every TTL/2, so junk outlives its sender by minutes at most).
    - ``max_keys`` / ``max_stored_bytes``: what one node stores at most; beyond it the source
      group holding the most records gives one up, as for a full key.
    - ``store_rate`` / ``store_burst``: records per second (and burst) one source group may
      store on this node; the rest are refused.
    - ``request_rate`` / ``request_burst``: requests per second (and burst) this node answers
      for one source group; the rest get no reply (this bounds what a forged source address
      can reflect toward its victim).
    - ``max_contacts_per_ip`` / ``max_contacts_per_subnet`` / ``max_contacts_per_subnet_in_bucket``:
      routing-table caps per IP and per /24 (IPv4) or /64 (IPv6), in the whole table and in
      one bucket. One ``ip:port`` is always one contact.
    - ``cap_private_addresses``: apply the per-IP and per-subnet routing-table caps and
      request rates to loopback, private and link-local addresses too (by default each
      endpoint there counts alone, so a local swarm of many processes can form).
    - ``private_groups`` (`PrivateGroups`, default ``host``): how those addresses are grouped
      for storage fairness, store rates and proof work: one group per host (one machine
      with many ports is one party; LAN machines stay apart), per endpoint, or per subnet
      (`swarm.dht.sources`).
    - ``proof_ttl`` / ``proof_timeout`` / ``proof_concurrency`` / ``proof_rate``: with a
      record prover (`swarm.dht.proofs`), how long a verdict is trusted, how long one proof
      may take, how many run at once and how many start per second.
    - ``handoff_keys`` / ``handoff_rate``: when a contact is verified, the keys near its id
      that we examine for records it should hold (at most this many), and the stores per
      second all such hand-offs may send together.
    - ``clock_skew``: how far peers' wall clocks may disagree (seconds). A record whose expiry
      is past ``now`` is expired; one expiring after ``now + max_ttl + clock_skew`` is refused.
    - ``rpc_timeout``: seconds to wait for one UDP reply.
    - ``bootstrap_timeout``: deadline for reaching ``initial_peers`` (at least one must answer).
    - ``join_crawl_timeout``: how long a full node's join may then spend looking up its own
      neighbourhood (a slow crawl shortens the lookup; it never fails the join).
    - ``evict_after_failures``: consecutive unanswered RPCs before a contact leaves the routing
      table (stock kademlia evicts after one, which loses live peers on a single lost packet).
    - ``announce_concurrency``: announces one node runs at once (UDP buffers overflow when
      hundreds of writers store at the same moment).
    - ``get_quorum``: a lookup stops once this many nodes answered with records (or all of the
      k closest were asked); their records are merged.
    - ``ksize``/``alpha``: Kademlia's k and alpha.
    - ``refresh_interval``: seconds between routing-table refreshes.
    - ``contact_check_interval``: contacts not heard from for this long are pinged (a few per
      interval); those that miss ``evict_after_failures`` pings in a row leave.
    """

    host: str = "127.0.0.1"
    port: int = 0
    initial_peers: tuple[str, ...] = ()
    swarm_key: bytes | None = None
    client_only: bool = False
    max_records_per_key: int = 40
    max_record_bytes: int = 1_200
    max_ttl: float = 600.0
    max_keys: int = 8_192
    max_stored_bytes: int = 32 * 1024 * 1024
    store_rate: float = 50.0
    store_burst: int = 400
    request_rate: float = 200.0
    request_burst: int = 1_000
    max_contacts_per_ip: int = 4
    max_contacts_per_subnet: int = 10
    max_contacts_per_subnet_in_bucket: int = 2
    cap_private_addresses: bool = False
    private_groups: PrivateGroups = PrivateGroups.HOST
    proof_ttl: float = 300.0
    proof_timeout: float = 5.0
    proof_concurrency: int = 4
    proof_rate: float = 5.0
    handoff_keys: int = 16
    handoff_rate: float = 20.0
    clock_skew: float = 30.0
    rpc_timeout: float = 2.0
    bootstrap_timeout: float = 10.0
    join_crawl_timeout: float = 10.0
    evict_after_failures: int = 2
    announce_concurrency: int = 16
    get_quorum: int = 3
    ksize: int = 20
    alpha: int = 3
    refresh_interval: float = 3600.0
    contact_check_interval: float = 60.0

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
            "join_crawl_timeout": self.join_crawl_timeout,
            "contact_check_interval": self.contact_check_interval,
            "store_rate": self.store_rate,
            "request_rate": self.request_rate,
            "handoff_rate": self.handoff_rate,
            "proof_ttl": self.proof_ttl,
            "proof_timeout": self.proof_timeout,
            "proof_rate": self.proof_rate,
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
            "max_keys": self.max_keys,
            "max_stored_bytes": self.max_stored_bytes,
            "store_burst": self.store_burst,
            "request_burst": self.request_burst,
            "max_contacts_per_ip": self.max_contacts_per_ip,
            "max_contacts_per_subnet": self.max_contacts_per_subnet,
            "max_contacts_per_subnet_in_bucket": self.max_contacts_per_subnet_in_bucket,
            "handoff_keys": self.handoff_keys,
            "proof_concurrency": self.proof_concurrency,
        }
        for name, count in counts.items():
            if count < 1:
                raise ConfigError(f"DHTConfig.{name} must be at least 1, got {count}")
        if not isinstance(self.private_groups, PrivateGroups):
            try:
                object.__setattr__(self, "private_groups", PrivateGroups(self.private_groups))
            except ValueError:
                choices = ", ".join(g.value for g in PrivateGroups)
                raise ConfigError(
                    f"private_groups must be one of {choices}, got {self.private_groups!r}"
                ) from None
        if self.clock_skew < 0:
            raise ConfigError("DHTConfig.clock_skew must not be negative")
