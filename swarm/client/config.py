"""`ClientConfig`: every knob of the client, one frozen value built by the caller."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from swarm.errors import ConfigError
from swarm.identity import Identity
from swarm.net.config import DEFAULT_NET_CONFIG, NetConfig
from swarm.types import FLOAT_DTYPES, DtypeName, parse_address, torch_dtype
from swarm.verify.policy import VerifyPolicy, parse_policy

__all__ = ["ClientConfig", "WireDtype"]

WireDtype = DtypeName


@dataclass(frozen=True)
class ClientConfig:
    """Settings of a client (`AsyncRemoteModel`, `RemoteModel`, `InferenceSession`).

    Peers and keys:

    - ``initial_peers``: ``"host:port"`` of any DHT nodes of the swarm.
    - ``swarm_key``: 32-byte private-swarm key (DHT datagrams and channels), or None.
    - ``identity``: the client's key pair; a fresh in-memory one by default.
    - ``net``: limits of the wire layer (`NetConfig`).

    Deadlines (seconds):

    - ``connect_timeout`` (10): dialing and handshaking one server.
    - ``request_timeout`` (10): a DHT lookup, an ``info`` call, opening a session.
    - ``step_timeout`` (30): one hop's answer to one step; past it the hop counts as failed.

    Failures:

    - ``ban_base_s`` (5), ``ban_backoff`` (2), ``ban_max_s`` (300): a failed server is left out
      of routes for ``min(base * backoff ** (failures - 1), max)`` seconds.
    - ``max_open_retries`` (4): servers that may fail while a session's route is opened.
    - ``max_recoveries`` (8): hop failures one session survives; beyond, `SessionError`.

    Hedged steps (a hop that is late, not failed):

    - ``hedge_after`` (3.0): a hop that has not answered a step within ``hedge_after`` times
      its usual time for a step of that many tokens (the 90th percentile of its last 16
      steps; multi-token steps scale with tokens) gets a replacement started in parallel
      (another server: open, replay the hop's history, run the step); the first full answer
      is kept and the other closed. 3× a high percentile is far outside a healthy hop's
      jitter, so few hedges are wasted. None: never hedge (wait up to ``step_timeout``).
    - ``hedge_floor`` (0.5): never hedge sooner than this many seconds into a step: below
      it, scheduling noise and GC pauses of fast hops would start needless replacements;
      above it, a stopped server costs more than the half second it takes.
    - ``slow_penalty`` (1.0), ``slow_penalty_half_life_s`` (60): a server that lost a hedged
      step is not banned but penalised: routes through it cost ``1 + penalty`` times as
      much, the penalty halving every half-life (and adding up when it is slow again).

    Pipeline:

    - ``use_push`` (True): servers push each hop's output to the next hop; off, the client
      relays every hop's input itself (one more client round trip per hop).
    - ``push_grace`` (1.0): with push on, how long after hop k's result arrives the client
      waits for hop k+1's result before it sends hop k+1's input itself (a duplicate input is
      ignored by the server, so this only bounds the delay when a push got lost).
    - ``wire_dtype`` ("float32"): dtype of the hidden states the client sends.

    Pings: ``ping_timeout`` (2), ``ping_concurrency`` (8 servers at once), ``ping_max_servers``
    (32 servers pinged per refresh), ``ping_ema`` (0.5: weight of a new sample),
    ``ping_interval_s`` (30: a server that answered is pinged again at most this often; one
    that did not is retried after a backoff from this doubling up to 20 times it),
    ``ping_new_per_host`` (2: servers never reached that are dialed per refresh at one host,
    so forged records naming one victim's address cannot turn the client into a dialer).

    Verification (`swarm.verify`):

    - ``verify`` ("none"): the policy, ``none``, ``spot-check:P``, ``redundant:K`` or
      ``optimistic``.
    - ``reputation_path`` ("~/.cache/swarm/reputation.json"): where audits and bans persist
      (read and written only when ``verify`` is not ``none``; None keeps them in memory).
    - ``verify_seed`` (None): seed of the audit coin flips (tests and benchmarks).
    - ``evidence_dir`` (None): folder for full evidence (input histories of proven lies).
    - ``ledger_path`` (None): a `FileLedger` of stakes (private swarms): stake lowers a peer's
      audit rate, a proven lie slashes it.
    """

    initial_peers: tuple[str, ...] = ()
    swarm_key: bytes | None = None
    identity: Identity = field(default_factory=Identity.generate, repr=False, compare=False)
    net: NetConfig = DEFAULT_NET_CONFIG
    connect_timeout: float = 10.0
    request_timeout: float = 10.0
    step_timeout: float = 30.0
    ban_base_s: float = 5.0
    ban_backoff: float = 2.0
    ban_max_s: float = 300.0
    max_open_retries: int = 4
    max_recoveries: int = 8
    hedge_after: float | None = 3.0
    hedge_floor: float = 0.5
    slow_penalty: float = 1.0
    slow_penalty_half_life_s: float = 60.0
    use_push: bool = True
    push_grace: float = 1.0
    wire_dtype: WireDtype = "float32"
    ping_timeout: float = 2.0
    ping_concurrency: int = 8
    ping_max_servers: int = 32
    ping_ema: float = 0.5
    ping_interval_s: float = 30.0
    ping_new_per_host: int = 2
    verify: str = "none"
    reputation_path: str | None = "~/.cache/swarm/reputation.json"
    verify_seed: int | None = None
    evidence_dir: str | None = None
    ledger_path: str | None = None

    def __post_init__(self) -> None:
        for peer in self.initial_peers:
            parse_address(peer)
        if self.swarm_key is not None and len(self.swarm_key) != 32:
            raise ConfigError(f"swarm key holds {len(self.swarm_key)} bytes; expected 32")
        for name in (
            "connect_timeout",
            "request_timeout",
            "step_timeout",
            "ban_base_s",
            "ban_max_s",
            "push_grace",
            "ping_timeout",
            "ping_interval_s",
            "hedge_floor",
            "slow_penalty_half_life_s",
        ):
            if not getattr(self, name) > 0:
                value = getattr(self, name)
                raise ConfigError(f"ClientConfig.{name} must be positive, got {value}")
        if self.hedge_after is not None and not self.hedge_after >= 1:
            raise ConfigError(
                f"ClientConfig.hedge_after must be >= 1 or None, got {self.hedge_after}"
            )
        if not self.slow_penalty >= 0:
            raise ConfigError(f"ClientConfig.slow_penalty must be >= 0, got {self.slow_penalty}")
        if self.ban_backoff < 1:
            raise ConfigError(f"ClientConfig.ban_backoff must be >= 1, got {self.ban_backoff}")
        for name in ("max_open_retries", "max_recoveries"):
            if getattr(self, name) < 0:
                raise ConfigError(f"ClientConfig.{name} must be >= 0")
        if self.ping_concurrency < 1 or self.ping_max_servers < 0 or self.ping_new_per_host < 1:
            raise ConfigError(
                "ping_concurrency and ping_new_per_host must be >= 1, ping_max_servers >= 0"
            )
        if not 0 < self.ping_ema <= 1:
            raise ConfigError(f"ClientConfig.ping_ema must be in (0, 1], got {self.ping_ema}")
        parse_policy(self.verify)
        if self.wire_dtype not in FLOAT_DTYPES:
            raise ConfigError(f"wire_dtype must be one of {', '.join(FLOAT_DTYPES)}")

    @property
    def policy(self) -> VerifyPolicy:
        """``verify`` parsed (checked when the config was made)."""
        return parse_policy(self.verify)

    @property
    def torch_wire_dtype(self) -> torch.dtype:
        """``wire_dtype`` as a torch dtype."""
        return torch_dtype(self.wire_dtype)
