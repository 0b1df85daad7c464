"""`NetConfig`: every limit and deadline of the wire layer, as one frozen value."""

from __future__ import annotations

from dataclasses import dataclass

from swarm.errors import ConfigError

__all__ = ["DEFAULT_NET_CONFIG", "NetConfig"]

MiB = 1024 * 1024


@dataclass(frozen=True)
class NetConfig:
    """Limits and deadlines for channels, RPC and the connection pool.

    Defaults:

    - ``max_frame_size`` (1 MiB): plaintext bytes in one encrypted frame. A longer message is
      split across frames; a frame header announcing more than this is refused before any
      buffer is made, so a peer can make us allocate at most this much per frame.
    - ``max_message_size`` (320 MiB): a whole message after reassembly. Sized for the largest
      hidden-state tensor we expect in one message (16k-token prefill × hidden 8192 × fp16 =
      256 MiB) plus envelope. Memory grows only as authenticated frames arrive.
    - ``handshake_timeout`` (10 s), ``connect_timeout`` (10 s): deadlines for setting a
      channel up.
    - ``call_timeout`` (30 s): default deadline of an RPC call, and of each stream receive.
    - ``send_timeout`` (60 s): a message send that takes longer breaks the channel.
    - ``max_concurrent_calls`` (256): calls a server runs at once per channel; more are
      answered with `LimitExceeded`.
    - ``stream_buffer`` (64): messages queued per stream before the stream is failed.
    - ``max_pool_connections`` (256): channels a `ConnectionPool` keeps (least recently used
      ones are closed first).
    """

    max_frame_size: int = 1 * MiB
    max_message_size: int = 320 * MiB
    handshake_timeout: float = 10.0
    connect_timeout: float = 10.0
    call_timeout: float = 30.0
    send_timeout: float = 60.0
    max_concurrent_calls: int = 256
    stream_buffer: int = 64
    max_pool_connections: int = 256

    def __post_init__(self) -> None:
        if not 1024 <= self.max_frame_size < 2**31 - 16:
            raise ConfigError("max_frame_size must be between 1 KiB and 2 GiB")
        if self.max_message_size < 1:
            raise ConfigError("max_message_size must be positive")
        for name in ("handshake_timeout", "connect_timeout", "call_timeout", "send_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive")
        for name in ("max_concurrent_calls", "stream_buffer", "max_pool_connections"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")


DEFAULT_NET_CONFIG = NetConfig()
