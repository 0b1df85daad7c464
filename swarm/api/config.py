"""`GatewayConfig`: every knob of the gateway, one frozen value built by the caller."""

from __future__ import annotations

from dataclasses import dataclass

from swarm.errors import ConfigError
from swarm.verify.policy import parse_policy

__all__ = ["GatewayConfig"]


@dataclass(frozen=True)
class GatewayConfig:
    """Settings of `swarm api` (`Gateway`, `create_app`, `serve_gateway`).

    Listening:

    - ``host`` ("127.0.0.1"), ``port`` (8000; 0 picks a free one).
    - ``model_name`` (""): the name ``/v1/models`` lists and requests give as ``model``
      (the model id is accepted too); "" uses the checkpoint's file or folder name.

    Access:

    - ``api_keys`` (()): accepted ``Authorization: Bearer`` keys; empty means no key is
      needed. ``/health`` never needs one. A completion's receipts are readable only with
      the key that asked for it.
    - ``allowed_hosts`` (()): ``Host`` header names accepted when no key is set, besides
      loopback names and the bound address (a web page a local user opens cannot reach a
      keyless gateway through DNS rebinding: its requests name the attacker's host).
    - ``max_body_bytes`` (1 MiB): a request body past it gets 413.

    Connections (per connection: an untrusted peer holds nothing for long):

    - ``max_connections`` (512): open HTTP connections at most, ``max_connections_per_host``
      (64) from one address (a public IPv6 /64 is one host). Past the host's cap a new
      connection is closed at once; past the total it takes the place of the oldest
      connection answering nothing of the host holding the most (at least two more than its
      own host), or is closed at once if there is none.
    - ``body_timeout_s`` (30): the whole request body must arrive within it (408).
    - ``send_timeout_s`` (30): a send to a client that does not read for that long ends the
      connection; its generation is cancelled, its swarm sessions closed, its slot freed.
    - ``send_budget_s`` (60): the same once the sends of one request have waited that long
      in all (a client that reads just fast enough to dodge ``send_timeout_s`` still loses
      its slot; one that keeps up never waits).
    - ``header_timeout_s`` (10): a request head must be complete this long after its first
      byte, or the connection is closed (a head that trickles in holds nothing for long).
    - A connection that sends nothing for 75 s after it opened or after its last answer is
      closed (Hypercorn's keep-alive timer, which runs until a whole head arrived).

    Load:

    - ``max_concurrent`` (8): generations running at once.
    - ``queue`` (32): requests waiting for a slot; past it a request gets 429.
    - ``retry_after_s`` (1): the ``Retry-After`` of a 429.
    - ``queue_timeout_s`` (60): a queued request that waits longer gets 429 too.
    - Slots and queue are shared per client address and per key (`swarm.api.admission`).
    - ``prepare_threads`` (2): worker threads that render and tokenize prompts (never the
      event loop).

    Generation:

    - ``verify`` ("none"): the policy of a request that names none (``"swarm": {"verify"}``).
    - ``max_redundancy`` (3): the most times a request's policy may run each step
      (``redundant:K`` with K above it gets 400; spot-check counts as 2).
    - ``default_max_tokens`` (256): tokens to generate when a request gives no limit.
    - ``max_length`` (0): tokens a session may hold (prompt + answer) at most; a request past
      it gets 400; 0 means the model's ``max_position_embeddings``.

    Receipts (``GET /v1/swarm/receipts/{id}``): the last ``receipts_keep`` (1000)
    completions' receipts, each kept ``receipts_ttl_s`` (3600) seconds at most.

    Status: ``refresh_s`` (5): how often the gateway asks the DHT for the servers again (routes
    and ``/health``, ``/v1/swarm/status`` use what it found).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = ""
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20
    max_concurrent: int = 8
    queue: int = 32
    retry_after_s: int = 1
    queue_timeout_s: float = 60.0
    verify: str = "none"
    default_max_tokens: int = 256
    max_length: int = 0
    receipts_keep: int = 1000
    receipts_ttl_s: float = 3600.0
    refresh_s: float = 5.0
    allowed_hosts: tuple[str, ...] = ()
    max_connections: int = 512
    max_connections_per_host: int = 64
    body_timeout_s: float = 30.0
    send_timeout_s: float = 30.0
    send_budget_s: float = 60.0
    header_timeout_s: float = 10.0
    prepare_threads: int = 2
    max_redundancy: int = 3

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        if self.max_concurrent < 1:
            raise ConfigError(f"max_concurrent must be at least 1, got {self.max_concurrent}")
        if self.queue < 0:
            raise ConfigError(f"queue must be 0 or more, got {self.queue}")
        for name in (
            "max_body_bytes",
            "default_max_tokens",
            "receipts_keep",
            "retry_after_s",
            "max_connections",
            "max_connections_per_host",
            "prepare_threads",
            "max_redundancy",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"GatewayConfig.{name} must be at least 1")
        if self.max_length < 0:
            raise ConfigError(f"max_length must be 0 or more, got {self.max_length}")
        for name in (
            "queue_timeout_s",
            "receipts_ttl_s",
            "refresh_s",
            "body_timeout_s",
            "send_timeout_s",
            "send_budget_s",
            "header_timeout_s",
        ):
            if not getattr(self, name) > 0:
                raise ConfigError(f"GatewayConfig.{name} must be positive")
        if any(not key for key in self.api_keys):
            raise ConfigError("an API key is empty")
        parse_policy(self.verify)
