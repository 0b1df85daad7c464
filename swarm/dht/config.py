"""`DHTConfig`: every knob of a DHT node, one frozen value built by the caller and passed whole.

Its knobs are grouped by what they govern (as `ServerConfig` and `ClientConfig` group theirs):
where the node listens and whom it joins stay on `DHTConfig` itself; `TimingConfig` holds its
deadlines and periods, `KademliaConfig` the protocol's parameters, `StorageConfig` what it
stores and for how long, `AdmissionConfig` how much it accepts from one source (contacts,
stores, requests), and `ProofConfig` how it checks records with a prover.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from swarm.dht.sources import PrivateGroups
from swarm.errors import ConfigError
from swarm.types import parse_address

__all__ = [
    "MAX_DATAGRAM_BYTES",
    "AdmissionConfig",
    "DHTConfig",
    "KademliaConfig",
    "ProofConfig",
    "StorageConfig",
    "TimingConfig",
]

# The largest UDP payload we send. Loopback and most paths carry up to 65,507 bytes (with IP
# fragmentation); we keep a margin for the datagram header and the encryption overhead.
MAX_DATAGRAM_BYTES = 60_000
# rpcudp refuses requests whose packed arguments exceed 8 KiB; a store carries one record.
_MAX_REQUEST_RECORD_BYTES = 7_000


def _positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ConfigError(f"{owner}.{name} must be positive, got {value}")


def _at_least_one(owner: str, **counts: int) -> None:
    for name, count in counts.items():
        if count < 1:
            raise ConfigError(f"{owner}.{name} must be at least 1, got {count}")


@dataclass(frozen=True)
class TimingConfig:
    """Deadlines and periods of a DHT node, in seconds.

    - ``rpc_timeout`` (2.0): how long to wait for one UDP reply.
    - ``bootstrap_timeout`` (10.0): deadline for reaching ``initial_peers`` (at least one
      must answer).
    - ``join_crawl_timeout`` (10.0): how long a full node's join may then spend looking up its
      own neighbourhood (a slow crawl shortens the lookup; it never fails the join).
    - ``refresh_interval`` (3600): between routing-table refreshes.
    - ``contact_check_interval`` (60): contacts not heard from for this long are pinged (a few
      per interval); those that miss ``KademliaConfig.evict_after_failures`` pings in a row
      leave.
    """

    rpc_timeout: float = 2.0
    bootstrap_timeout: float = 10.0
    join_crawl_timeout: float = 10.0
    refresh_interval: float = 3600.0
    contact_check_interval: float = 60.0

    def __post_init__(self) -> None:
        _positive(
            "TimingConfig",
            rpc_timeout=self.rpc_timeout,
            bootstrap_timeout=self.bootstrap_timeout,
            join_crawl_timeout=self.join_crawl_timeout,
            refresh_interval=self.refresh_interval,
            contact_check_interval=self.contact_check_interval,
        )


@dataclass(frozen=True)
class KademliaConfig:
    """The protocol's parameters.

    - ``ksize`` (20) / ``alpha`` (3): Kademlia's k and alpha.
    - ``get_quorum`` (3): a lookup stops once this many nodes answered with records (or all of
      the k closest were asked); their records are merged.
    - ``evict_after_failures`` (2): consecutive unanswered RPCs before a contact leaves the
      routing table (stock kademlia evicts after one, which loses live peers on a single lost
      packet).
    - ``announce_concurrency`` (16): announces one node runs at once (UDP buffers overflow
      when hundreds of writers store at the same moment).
    """

    ksize: int = 20
    alpha: int = 3
    get_quorum: int = 3
    evict_after_failures: int = 2
    announce_concurrency: int = 16

    def __post_init__(self) -> None:
        _at_least_one(
            "KademliaConfig",
            ksize=self.ksize,
            alpha=self.alpha,
            get_quorum=self.get_quorum,
            evict_after_failures=self.evict_after_failures,
            announce_concurrency=self.announce_concurrency,
        )


@dataclass(frozen=True)
class StorageConfig:
    """What one node stores, for how long, and what it hands to new neighbours.

    - ``max_records_per_key`` (40): records one key holds. When it is full, a record from a
      new signer takes the place of one from the source group (see `swarm.dht.sources`)
      holding the most records of that key, if that group holds at least two more than the
      newcomer's; otherwise it is refused. Together with ``max_record_bytes`` this keeps a
      reply inside one datagram (checked here).
    - ``max_record_bytes`` (1,200): the largest encoded, signed record (``announce`` raises
      beyond it).
    - ``max_ttl`` (600): storing nodes refuse records that expire further ahead than this
      (announcers re-announce every TTL/2, so junk outlives its sender by minutes at most).
    - ``clock_skew`` (30): how far peers' wall clocks may disagree. A record whose expiry is
      past ``now`` is expired; one expiring after ``now + max_ttl + clock_skew`` is refused.
    - ``max_keys`` (8,192) / ``max_stored_bytes`` (32 MiB): what one node stores at most;
      beyond it the source group holding the most records gives one up, as for a full key.
    - ``handoff_keys`` (16) / ``handoff_rate`` (20/s): when a contact is verified, the keys
      near its id that we examine for records it should hold (at most this many), and the
      stores per second all such hand-offs may send together.
    - ``verified_cache`` (4,096): how many recently verified records (SHA-256 digests of
      their exact bytes) a node remembers, so that it does not verify the same signature
      again (`swarm.dht.records.VerifiedRecords`); 0 verifies every time.
    """

    max_records_per_key: int = 40
    max_record_bytes: int = 1_200
    max_ttl: float = 600.0
    clock_skew: float = 30.0
    max_keys: int = 8_192
    max_stored_bytes: int = 32 * 1024 * 1024
    handoff_keys: int = 16
    handoff_rate: float = 20.0
    verified_cache: int = 4_096

    def __post_init__(self) -> None:
        if self.verified_cache < 0:
            raise ConfigError(f"verified_cache must be >= 0, got {self.verified_cache}")
        if not 0 < self.max_record_bytes <= _MAX_REQUEST_RECORD_BYTES:
            raise ConfigError(f"max_record_bytes must be in 1..{_MAX_REQUEST_RECORD_BYTES}")
        _at_least_one(
            "StorageConfig",
            max_records_per_key=self.max_records_per_key,
            max_keys=self.max_keys,
            max_stored_bytes=self.max_stored_bytes,
            handoff_keys=self.handoff_keys,
        )
        if self.max_records_per_key * (self.max_record_bytes + 8) + 1024 > MAX_DATAGRAM_BYTES:
            raise ConfigError(
                f"{self.max_records_per_key} records of {self.max_record_bytes} bytes do not fit "
                f"one {MAX_DATAGRAM_BYTES}-byte datagram; lower max_records_per_key"
            )
        _positive("StorageConfig", max_ttl=self.max_ttl, handoff_rate=self.handoff_rate)
        if self.clock_skew < 0:
            raise ConfigError("StorageConfig.clock_skew must not be negative")


@dataclass(frozen=True)
class AdmissionConfig:
    """How much one source may get from a node: routing-table places, stores, replies.

    - ``store_rate`` (50/s) / ``store_burst`` (400): records per second (and burst) one source
      group may store on this node; the rest are refused.
    - ``request_rate`` (200/s) / ``request_burst`` (1,000): requests per second (and burst)
      this node answers for one source group; the rest get no reply (this bounds what a
      forged source address can reflect toward its victim).
    - ``max_contacts_per_ip`` (4) / ``max_contacts_per_subnet`` (10) /
      ``max_contacts_per_subnet_in_bucket`` (2): routing-table caps per IP and per /24 (IPv4)
      or /64 (IPv6), in the whole table and in one bucket. One ``ip:port`` is always one
      contact.
    - ``cap_private_addresses`` (False): apply the per-IP and per-subnet routing-table caps
      and request rates to loopback, private and link-local addresses too (by default each
      endpoint there counts alone, so a local swarm of many processes can form).
    - ``private_groups`` (`PrivateGroups`, default ``host``): how those addresses are grouped
      for storage fairness, store rates and proof work: one group per host (one machine with
      many ports is one party; LAN machines stay apart), per endpoint, or per subnet
      (`swarm.dht.sources`). A string naming one is accepted and converted.
    """

    store_rate: float = 50.0
    store_burst: int = 400
    request_rate: float = 200.0
    request_burst: int = 1_000
    max_contacts_per_ip: int = 4
    max_contacts_per_subnet: int = 10
    max_contacts_per_subnet_in_bucket: int = 2
    cap_private_addresses: bool = False
    private_groups: PrivateGroups = PrivateGroups.HOST

    def __post_init__(self) -> None:
        _positive("AdmissionConfig", store_rate=self.store_rate, request_rate=self.request_rate)
        _at_least_one(
            "AdmissionConfig",
            store_burst=self.store_burst,
            request_burst=self.request_burst,
            max_contacts_per_ip=self.max_contacts_per_ip,
            max_contacts_per_subnet=self.max_contacts_per_subnet,
            max_contacts_per_subnet_in_bucket=self.max_contacts_per_subnet_in_bucket,
        )
        if not isinstance(self.private_groups, PrivateGroups):
            try:
                object.__setattr__(self, "private_groups", PrivateGroups(self.private_groups))
            except ValueError:
                choices = ", ".join(g.value for g in PrivateGroups)
                raise ConfigError(
                    f"private_groups must be one of {choices}, got {self.private_groups!r}"
                ) from None


@dataclass(frozen=True)
class ProofConfig:
    """Checking records with a record prover (`swarm.dht.proofs`); unused without one.

    - ``ttl`` (300 s): how long a verdict is trusted.
    - ``timeout`` (5 s): how long one proof may take.
    - ``concurrency`` (4): proofs running at once.
    - ``rate`` (5/s): proofs started per second.
    """

    ttl: float = 300.0
    timeout: float = 5.0
    concurrency: int = 4
    rate: float = 5.0

    def __post_init__(self) -> None:
        _positive("ProofConfig", ttl=self.ttl, timeout=self.timeout, rate=self.rate)
        _at_least_one("ProofConfig", concurrency=self.concurrency)


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
    - ``timing`` (`TimingConfig`), ``kademlia`` (`KademliaConfig`), ``storage``
      (`StorageConfig`), ``admission`` (`AdmissionConfig`), ``proofs`` (`ProofConfig`): the
      rest, grouped by what they govern, each with its defaults documented on its class.
    """

    host: str = "127.0.0.1"
    port: int = 0
    initial_peers: tuple[str, ...] = ()
    swarm_key: bytes | None = None
    client_only: bool = False
    timing: TimingConfig = field(default_factory=TimingConfig)
    kademlia: KademliaConfig = field(default_factory=KademliaConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    proofs: ProofConfig = field(default_factory=ProofConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"DHT port {self.port} is outside 0..65535")
        for peer in self.initial_peers:
            parse_address(peer)
        if self.swarm_key is not None and len(self.swarm_key) != 32:
            raise ConfigError(f"swarm key holds {len(self.swarm_key)} bytes; expected 32")
