"""`ClientConfig`: every knob of the client, one frozen value built by the caller, its knobs
grouped by what they govern (as `ServerConfig` groups a server's): `FailureConfig`,
`HedgeConfig`, `PipelineConfig`, `PingConfig` and `RecordsConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from swarm.errors import ConfigError
from swarm.identity import Identity
from swarm.net.config import DEFAULT_NET_CONFIG, NetConfig
from swarm.net.punch import DEFAULT_PUNCH_CONFIG, PunchConfig
from swarm.types import FLOAT_DTYPES, DtypeName, QuantName, parse_address, torch_dtype
from swarm.verify.policy import VerifyPolicy, parse_policy

__all__ = [
    "ClientConfig",
    "FailureConfig",
    "HedgeConfig",
    "PingConfig",
    "PipelineConfig",
    "RecordsConfig",
    "SpeculationConfig",
    "WireDtype",
]

WireDtype = DtypeName


def _positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ConfigError(f"{owner}.{name} must be positive, got {value}")


@dataclass(frozen=True)
class FailureConfig:
    """What a chain does about servers that fail it (`swarm.client.chain.FailurePolicy`).

    - ``ban_base_s`` (5), ``ban_backoff`` (2), ``ban_max_s`` (300): a failed server is left out
      of routes for ``min(base * backoff ** (failures - 1), max)`` seconds.
    - ``max_open_retries`` (4): attempts to open a chain's route that may fail (every
      server that failed in one attempt is banned, and the range planned again).
    - ``max_recoveries`` (8): hop failures one chain survives; beyond, `SessionError`.
    - ``route_wait_s`` (60): when a failed hop's layers have no other usable server, its
      recovery keeps asking the directory (after 1 s, then doubling up to 4 s between
      looks) for this many seconds before it gives up with `RoutingError`: volunteers
      leave without notice, and the swarm's rebalancing covers a block whose last server
      left within a few balance periods once that server's records expire, so a generation
      that waits keeps its tokens instead of starting over. 0: give up at once. Opening a
      chain does not wait (``swarm generate --wait`` does that before it starts).
    """

    ban_base_s: float = 5.0
    ban_backoff: float = 2.0
    ban_max_s: float = 300.0
    max_open_retries: int = 4
    max_recoveries: int = 8
    route_wait_s: float = 60.0

    def __post_init__(self) -> None:
        _positive("FailureConfig", ban_base_s=self.ban_base_s, ban_max_s=self.ban_max_s)
        if self.ban_backoff < 1:
            raise ConfigError(f"FailureConfig.ban_backoff must be >= 1, got {self.ban_backoff}")
        if self.max_open_retries < 0 or self.max_recoveries < 0:
            raise ConfigError("FailureConfig.max_open_retries and max_recoveries must be >= 0")
        if not self.route_wait_s >= 0:
            raise ConfigError(f"FailureConfig.route_wait_s must be >= 0, got {self.route_wait_s}")

    @staticmethod
    def route_look_s(looks: int) -> float:
        """Seconds to wait before looking for a route again after ``looks`` looks found none
        (1 s, then doubling up to 4 s; see ``route_wait_s``)."""
        return min(2.0 ** max(looks - 1, 0), 4.0)


@dataclass(frozen=True)
class HedgeConfig:
    """Hedged steps: a hop that is late, not failed (`swarm.client.chain.hedging`).

    - ``after`` (3.0): a hop that has not answered a step within ``after`` times its usual
      time for a step of that many tokens (the 90th percentile of its last 16 steps;
      multi-token steps scale with tokens) gets a replacement started in parallel (another
      server: open, replay the hop's history, run the step); the first full answer is kept
      and the other closed. 3× a high percentile is far outside a healthy hop's jitter, so
      few hedges are wasted. None: never hedge (wait up to ``step_timeout``).
    - ``floor`` (0.5): never hedge sooner than this many seconds into a step: below it,
      scheduling noise and GC pauses of fast hops would start needless replacements; above
      it, a stopped server costs more than the half second it takes.
    - ``slow_penalty`` (1.0), ``slow_penalty_half_life_s`` (60): a server that lost a hedged
      step is not banned but penalised: routes through it cost ``1 + penalty`` times as
      much, the penalty halving every half-life (and adding up when it is slow again).
    - ``move_after`` (2), ``move_window`` (64): a hop whose server was raced and still
      answered first ``move_after`` times within its last ``move_window`` steps is moved
      before its next step (another server opens and replays its history, as a hedge's
      replacement does): a server slow on one step in sixteen would otherwise keep its
      place and cost a wasted replay every sixteen tokens. None: never move such a hop.
    """

    after: float | None = 3.0
    floor: float = 0.5
    slow_penalty: float = 1.0
    slow_penalty_half_life_s: float = 60.0
    move_after: int | None = 2
    move_window: int = 64

    def __post_init__(self) -> None:
        _positive(
            "HedgeConfig", floor=self.floor, slow_penalty_half_life_s=self.slow_penalty_half_life_s
        )
        if self.after is not None and not self.after >= 1:
            raise ConfigError(f"HedgeConfig.after must be >= 1 or None, got {self.after}")
        if not self.slow_penalty >= 0:
            raise ConfigError(f"HedgeConfig.slow_penalty must be >= 0, got {self.slow_penalty}")
        if (self.move_after is not None and self.move_after < 1) or self.move_window < 1:
            raise ConfigError(
                f"HedgeConfig.move_after must be >= 1 or None and move_window >= 1, got "
                f"{self.move_after} and {self.move_window}"
            )


@dataclass(frozen=True)
class PipelineConfig:
    """How hidden states travel along a chain.

    - ``use_push`` (True): servers push each hop's output to the next hop; off, the client
      relays every hop's input itself (one more client round trip per hop).
    - ``push_grace`` (1.0): with push on, how long after hop k's result arrives the client
      waits for hop k+1's result before it sends hop k+1's input itself (a duplicate input is
      ignored by the server, so this only bounds the delay when a push got lost).
    - ``wire_dtype`` ("float32"): dtype of the hidden states the client sends.
    """

    use_push: bool = True
    push_grace: float = 1.0
    wire_dtype: WireDtype = "float32"

    def __post_init__(self) -> None:
        _positive("PipelineConfig", push_grace=self.push_grace)
        if self.wire_dtype not in FLOAT_DTYPES:
            raise ConfigError(f"wire_dtype must be one of {', '.join(FLOAT_DTYPES)}")


@dataclass(frozen=True)
class PingConfig:
    """The client's own pings to servers (routing costs): ``timeout`` (2 s), ``concurrency``
    (8 servers at once), ``max_servers`` (32 servers pinged per refresh), ``ema`` (0.5:
    weight of a new sample), ``interval_s`` (30: a server that answered is pinged again at
    most this often; one that did not is retried after a backoff from this doubling up to 20
    times it), ``new_per_host`` (2: servers never reached that are dialed per refresh at one
    host, so forged records naming one victim's address cannot turn the client into a
    dialer)."""

    timeout: float = 2.0
    concurrency: int = 8
    max_servers: int = 32
    ema: float = 0.5
    interval_s: float = 30.0
    new_per_host: int = 2

    def __post_init__(self) -> None:
        _positive("PingConfig", timeout=self.timeout, interval_s=self.interval_s)
        if self.concurrency < 1 or self.max_servers < 0 or self.new_per_host < 1:
            raise ConfigError(
                "PingConfig.concurrency and new_per_host must be >= 1, max_servers >= 0"
            )
        if not 0 < self.ema <= 1:
            raise ConfigError(f"PingConfig.ema must be in (0, 1], got {self.ema}")


@dataclass(frozen=True)
class RecordsConfig:
    """Where verification keeps what it learns (read and written only when ``verify`` is not
    ``none``).

    - ``reputation_path`` ("~/.cache/swarm/reputation.json"): audits and bans (None keeps
      them in memory).
    - ``seed`` (None): seed of the audit coin flips (tests and benchmarks).
    - ``evidence_dir`` (None): folder for full evidence (input histories of proven lies).
    - ``ledger_path`` (None): a `FileLedger` of stakes (private swarms): stake lowers a peer's
      audit rate, a proven lie slashes it.
    """

    reputation_path: str | None = "~/.cache/swarm/reputation.json"
    seed: int | None = None
    evidence_dir: str | None = None
    ledger_path: str | None = None


SPECULATION_MODES = ("auto", "off", "ngram")


@dataclass(frozen=True)
class SpeculationConfig:
    """Speculative decoding (DESIGN §13): a step carries guessed tokens, so one round trip
    through the chain can yield several tokens; the answer is the one plain decoding gives.

    - ``mode`` ("off"): ``"off"``; ``"ngram"`` (prompt lookup: guesses copied from earlier
      text, drafted whenever a match is found); ``"auto"`` (prompt lookup, with k chosen each
      round from the measured acceptance and the cost of a round, 0 when it does not pay);
      or the path or hub name of a draft model whose tokenizer is the target's (k chosen as
      in ``auto``). Off by default: a step of several positions is computed with other
      rounding than a step of one (MKL's kernels by row count; quantized servers multiply in
      bfloat16), so where two tokens are nearly tied the answer can differ from plain
      decoding's; with batch-invariant numerics it is the same.
    - ``max_k`` (8): the most tokens guessed in one round.
    - ``fixed_k`` (None): guess exactly this many every round (tests and benchmarks).
    """

    mode: str = "off"
    max_k: int = 8
    fixed_k: int | None = None

    def __post_init__(self) -> None:
        if not self.mode:
            raise ConfigError("speculation mode must be auto, off, ngram or a draft model's path")
        if not 1 <= self.max_k <= 32:
            raise ConfigError(f"SpeculationConfig.max_k must be in 1..32, got {self.max_k}")
        if self.fixed_k is not None and not 0 <= self.fixed_k <= self.max_k:
            raise ConfigError(f"SpeculationConfig.fixed_k must be in 0..max_k, got {self.fixed_k}")

    @property
    def draft_model(self) -> str | None:
        """The draft model's path or hub name, None for the built-in modes."""
        return None if self.mode in SPECULATION_MODES else self.mode


@dataclass(frozen=True)
class ClientConfig:
    """Settings of a client (`AsyncRemoteModel`, `RemoteModel`, `Chain`).

    Peers and keys:

    - ``initial_peers``: ``"host:port"`` of any DHT nodes of the swarm.
    - ``swarm_key``: 32-byte private-swarm key (DHT datagrams and channels), or None.
    - ``identity``: the client's key pair; a fresh in-memory one by default.
    - ``net``: limits of the wire layer (`NetConfig`).

    Deadlines (seconds):

    - ``connect_timeout`` (10): dialing and handshaking one server.
    - ``request_timeout`` (10): a DHT lookup, an ``info`` call, opening a session.
    - ``step_timeout`` (30): one hop's answer to one step; past it the hop counts as failed.

    What it runs on and how it checks:

    - ``verify`` ("none"): the policy, ``none``, ``spot-check:P``, ``redundant:K`` or
      ``optimistic`` (`swarm.verify`).
    - ``quant`` (None): route only through servers whose weights are kept this way
      (``"none"``, ``"int8"``, ``"int4"``, as they announce); None: any.
    - ``head_quant`` ("none"): how the client keeps its own lm_head: ``"none"`` (the
      checkpoint's weights in float32) or ``"int8"`` (one scale per vocabulary row, through
      PyTorch's int8 kernel: SmolLM2's head 9 ms instead of 13 ms per token, logits within
      ~0.4 of the float head's, so a greedy answer can take another turn where two tokens
      are nearly tied; see `swarm.shards.head`). The default keeps the outputs the float
      model's.
    - ``head_screen`` (True): greedy decoding with the float head finds its token through
      an int8 pass over the vocabulary and float32 for the tokens that could still win
      (`swarm.shards.screen`): the same tokens as the float head, bit for bit, for ~3/4 of
      its time (SmolLM2 on one CPU thread: ~7 ms instead of ~10 ms per token), for 1/4 more
      of lm_head's bytes in memory. Sampling always uses the float logits. Only a float32
      head on the CPU has one; False: never.
    - ``direct`` (`DEFAULT_PUNCH_CONFIG`): a `PunchConfig` to try a direct connection (TCP
      simultaneous open coordinated through the relay, `swarm.net.punch`) to each relayed
      server once the client's ping reached it through its relay, beside the relayed
      channel (a refresh waits ``direct.wait`` for it at most; a failed punch leaves the
      relay, and the server is tried again only after a backoff); the route then reports
      it ``direct`` (``upgraded``). None (``--no-direct``): relayed servers stay relayed.

    Groups: ``failures`` (`FailureConfig`: bans, retries, recoveries), ``hedging``
    (`HedgeConfig`), ``pipeline`` (`PipelineConfig`: push, wire dtype), ``pings``
    (`PingConfig`), ``records`` (`RecordsConfig`: reputation, evidence, stake),
    ``speculation`` (`SpeculationConfig`: guessed tokens per round trip).
    """

    initial_peers: tuple[str, ...] = ()
    swarm_key: bytes | None = None
    identity: Identity = field(default_factory=Identity.generate, repr=False, compare=False)
    net: NetConfig = DEFAULT_NET_CONFIG
    connect_timeout: float = 10.0
    request_timeout: float = 10.0
    step_timeout: float = 30.0
    verify: str = "none"
    quant: QuantName | None = None
    head_quant: QuantName = "none"
    head_screen: bool = True
    direct: PunchConfig | None = DEFAULT_PUNCH_CONFIG
    failures: FailureConfig = field(default_factory=FailureConfig)
    hedging: HedgeConfig = field(default_factory=HedgeConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    pings: PingConfig = field(default_factory=PingConfig)
    records: RecordsConfig = field(default_factory=RecordsConfig)
    speculation: SpeculationConfig = field(default_factory=SpeculationConfig)

    def __post_init__(self) -> None:
        for peer in self.initial_peers:
            parse_address(peer)
        if self.swarm_key is not None and len(self.swarm_key) != 32:
            raise ConfigError(f"swarm key holds {len(self.swarm_key)} bytes; expected 32")
        _positive(
            "ClientConfig",
            connect_timeout=self.connect_timeout,
            request_timeout=self.request_timeout,
            step_timeout=self.step_timeout,
        )
        parse_policy(self.verify)
        if self.quant not in (None, "none", "int8", "int4"):
            raise ConfigError(f"ClientConfig.quant must be none, int8 or int4, got {self.quant!r}")
        if self.head_quant not in ("none", "int8"):
            raise ConfigError(
                f"ClientConfig.head_quant must be none or int8, got {self.head_quant!r}"
            )

    @property
    def policy(self) -> VerifyPolicy:
        """``verify`` parsed (checked when the config was made)."""
        return parse_policy(self.verify)

    @property
    def torch_wire_dtype(self) -> torch.dtype:
        """``pipeline.wire_dtype`` as a torch dtype."""
        return torch_dtype(self.pipeline.wire_dtype)
