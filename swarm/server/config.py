"""`ServerConfig`: everything a serving peer is told, in one frozen value."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from swarm.dht import DHTConfig
from swarm.errors import ConfigError
from swarm.net.config import NetConfig
from swarm.server.balance import BalanceConfig
from swarm.server.capacity import MemoryPlan
from swarm.server.compute import ComputeConfig
from swarm.server.reachability import ReachabilityConfig
from swarm.server.sessions import SessionLimits
from swarm.shards import Quantization
from swarm.types import FLOAT_DTYPES, LayerRange

__all__ = ["ServerConfig"]

DTYPES = ("auto", *FLOAT_DTYPES)


@dataclass(frozen=True)
class ServerConfig:
    """How a server serves.

    ``layers`` None means "auto": pick the range with the least announced throughput.
    ``public_host`` is the address announced to others (default: ``host``).
    ``announce_ttl`` is the life of each DHT record; the server re-announces every half of
    it. ``step_timeout`` bounds the wait for one step's input (from the client or a push);
    ``push_timeout`` bounds delivering our output to the next server.

    ``compute`` is how the compute worker batches and chunks (`ComputeConfig`).
    ``forward_deadline`` (30 s, a client's default step timeout) bounds a stateless
    forward: one that the measured prompt rate says would take longer is refused with
    `LimitExceeded` up front. ``memory`` shares out free memory when ``num_blocks`` (with
    ``layers`` None) is None, or when ``cache_tokens_from_memory`` replaces
    ``limits.cache_tokens`` with what the memory left after the blocks holds.
    ``reachability``: dial-back checks, relays while not reachable, relaying for others
    (`ReachabilityConfig`).
    ``balance`` is when and how the server moves to the range the swarm needs most
    (`BalanceConfig`; by default only a server started with ``layers`` None moves).
    ``timings_dir``: where the throughput measured once online is kept between starts
    (`swarm.server.timings_store`; None: not kept). A start that finds one stored for the
    same model, range, weights, dtype, device and software announces it as its first
    estimate and goes online without measuring first; `swarm serve` keeps them in
    ``~/.cache/swarm/timings``.
    """

    model: Path
    layers: LayerRange | None = None
    num_blocks: int | None = None  # with layers=None: blocks to serve (None: from free memory)
    host: str = "127.0.0.1"
    port: int = 0
    public_host: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    quant: Quantization | None = None  # None: the checkpoint's own where a kernel exists
    num_threads: int = 1
    identity_path: Path | None = None
    swarm_key_path: Path | None = None
    dht: DHTConfig = field(default_factory=DHTConfig)
    limits: SessionLimits = field(default_factory=SessionLimits)
    announce_ttl: float = 60.0
    step_timeout: float = 300.0
    push_timeout: float = 5.0
    ping_timeout: float = 2.0
    net: NetConfig = field(default_factory=NetConfig)
    measure_throughput: bool = True
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    forward_deadline: float = 30.0
    memory: MemoryPlan = field(default_factory=MemoryPlan)
    cache_tokens_from_memory: bool = False
    reachability: ReachabilityConfig = field(default_factory=ReachabilityConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    timings_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.num_threads < 1:
            raise ConfigError(f"num_threads must be >= 1, got {self.num_threads}")
        if self.announce_ttl <= 0:
            raise ConfigError(f"announce_ttl must be positive, got {self.announce_ttl}")
        if self.forward_deadline <= 0:
            raise ConfigError(f"forward_deadline must be positive, got {self.forward_deadline}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ConfigError(f"num_blocks must be >= 1, got {self.num_blocks}")
