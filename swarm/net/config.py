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

    Limits of an `RpcServer` (inbound connections):

    - ``max_connections`` (384): authenticated channels kept open. A peer that completes a
      handshake when all are taken makes the server close an idle channel (no call or
      stream in flight): one from the address holding the most channels, idle the longest.
      Only if every channel is busy is the newcomer refused (`LimitExceeded` on the
      dialer). So idle channels, however many, never lock a new client out.
    - ``max_handshakes`` (64): connections still in their handshake (unauthenticated). A
      new one past this closes the oldest of them from the address with the most; it
      never displaces an authenticated channel. The server holds at most
      ``max_connections + max_handshakes`` inbound sockets: 448 by default, which leaves
      room under the usual 1024-descriptor limit for ``max_pool_connections`` outbound
      channels, the DHT and model files.
    - ``max_connections_per_peer`` (8): authenticated channels from one `PeerId`; past it
      the handshake is refused with `LimitExceeded`. A pool keeps one channel per server,
      so 8 leaves room for several processes sharing an identity.
    - ``max_connections_per_ip`` (64): connections (in handshake or authenticated) from one
      IP address; past it a new connection is closed before the handshake. Loopback and
      NAT put many peers behind one address, hence well above the per-peer cap.
    - ``idle_timeout`` (120 s): an authenticated channel with no call or stream in flight
      and no frame sent or received for this long is closed. Pools redial on the next
      call (one handshake, about a millisecond on a LAN).
    - ``max_receive_bytes`` (1 GiB): bytes of messages being received, across all the
      channels that share one `ReceiveBudget` (all of a server's inbound channels). A
      frame or joined message that would pass it is refused before it is allocated; that
      channel fails with `LimitExceeded` and is closed, others are unaffected. Only
      messages of several frames are counted (one frame is bounded by ``max_frame_size``),
      and they count twice while their frames are joined, so this must be at least
      ``2 * max_message_size``; 1 GiB takes one message of the maximum size at once, with
      room for several ordinary multi-megabyte ones.
    - ``message_timeout`` (60 s): once the first frame of a message of several frames has
      arrived, the rest must arrive within this (so no peer holds budget by stalling);
      the same bound as a sender's ``send_timeout``.

    The handshake deadline of unauthenticated connections is ``handshake_timeout``.
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
    max_connections: int = 384
    max_handshakes: int = 64
    max_connections_per_peer: int = 8
    max_connections_per_ip: int = 64
    idle_timeout: float = 120.0
    max_receive_bytes: int = 1024 * MiB
    message_timeout: float = 60.0

    def __post_init__(self) -> None:
        if not 1024 <= self.max_frame_size < 2**31 - 16:
            raise ConfigError("max_frame_size must be between 1 KiB and 2 GiB")
        if self.max_message_size < 1:
            raise ConfigError("max_message_size must be positive")
        for name in _POSITIVE_TIMES:
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive")
        for name in _AT_LEAST_ONE:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.max_receive_bytes < 2 * self.max_message_size:
            raise ConfigError(
                "max_receive_bytes must be at least 2 * max_message_size "
                "(a message of several frames is counted twice while it is joined)"
            )


_POSITIVE_TIMES = (
    "handshake_timeout",
    "connect_timeout",
    "call_timeout",
    "send_timeout",
    "idle_timeout",
    "message_timeout",
)
_AT_LEAST_ONE = (
    "max_concurrent_calls",
    "stream_buffer",
    "max_pool_connections",
    "max_connections",
    "max_handshakes",
    "max_connections_per_peer",
    "max_connections_per_ip",
)


DEFAULT_NET_CONFIG = NetConfig()
