"""Every message that crosses the wire, declared once (the machinery is `swarm.net.schema`).

Each is a frozen dataclass registered under its tag; see `swarm.net.schema` for the field
types understood, the bounds and the strict decoder. The schema API is re-exported here, so
`from swarm.net.messages import ...` is all a module needs.
"""

from __future__ import annotations

import torch

from swarm.errors import ErrorCode
from swarm.net.schema import (
    PROTOCOL_VERSION,
    Message,
    bounded,
    decode_message,
    encode_message,
    message,
    message_from_wire,
    unpack,
)
from swarm.types import (
    DtypeName,
    LayerRange,
    MoveReason,
    PeerId,
    QuantName,
    Reachability,
    ServerState,
)

__all__ = [
    "PROTOCOL_VERSION",
    "DialBackRequest",
    "DialBackResponse",
    "ErrorResponse",
    "Evidence",
    "ForwardRequest",
    "ForwardResponse",
    "InferenceInput",
    "InferenceOpen",
    "InferenceReady",
    "InferenceStepResult",
    "InfoRequest",
    "InfoResponse",
    "Message",
    "NewPushTarget",
    "NewPusher",
    "PingEntry",
    "PunchAddress",
    "PunchConnect",
    "PunchSync",
    "PushRequest",
    "PushTarget",
    "RangeMove",
    "Receipt",
    "RelayAnnouncement",
    "RelayCircuit",
    "RelayHop",
    "RelayReady",
    "RelayReserve",
    "ServerAnnouncement",
    "bounded",
    "decode_message",
    "encode_message",
    "message",
    "message_from_wire",
    "unpack",
]

_SESSION_ID = 64  # bytes


@message("error")
class ErrorResponse(Message):
    """A call failed on the remote side: a code from a closed set and a safe message."""

    code: ErrorCode
    message: str = bounded(max_len=2048)


@message("info_request")
class InfoRequest(Message):
    """Ask a server what it serves and how loaded it is."""


@message("info_response")
class InfoResponse(Message):
    layer_range: LayerRange
    state: ServerState
    load: float = bounded(ge=0.0)
    free_cache_tokens: int = bounded(ge=0)
    version: str = bounded(max_len=64)
    throughput: float = bounded(ge=0.0)  # tokens per second for the whole span
    model_id: str = bounded(max_len=128, default="")
    dtype: str = bounded(max_len=16, default="")
    active_sessions: int = bounded(ge=0, default=0)
    reachability: Reachability = Reachability.UNKNOWN
    relayed: bool = False  # reachable only through relays it announces
    quantization: QuantName = "none"
    # What verification compares by: the dtype, plus the quantization when the quantized
    # weights differ from the checkpoint's ("float32+int8"); "" from older servers.
    numerics: str = bounded(max_len=32, default="")


@message("receipt")
class Receipt(Message):
    """A server's signed statement of one computation (see `swarm.verify.receipts`)."""

    model_id: str = bounded(max_len=128)
    layer_range: LayerRange
    session_id: bytes = bounded(max_len=_SESSION_ID)  # b"" for a stateless forward
    step: int = bounded(ge=0)
    input_sha256: bytes = bounded(max_len=32)
    output_sha256: bytes = bounded(max_len=32)
    public_key: bytes = bounded(max_len=32)  # Ed25519; its SHA-256 is the server's PeerId
    signature: bytes = bounded(max_len=64)


@message("evidence")
class Evidence(Message):
    """A reporter's signed claim that ``receipt`` was contradicted by a majority of re-runs."""

    receipt: Receipt
    history_sha256: bytes = bounded(max_len=32)  # inputs then positions of the whole history
    first_bad_position: int = bounded(ge=0)
    reference_sha256: bytes = bounded(max_len=32)  # the majority's output at the receipt's step
    checkers: int = bounded(ge=0, le=64)  # how many re-runs agreed against the receipt
    reporter_key: bytes = bounded(max_len=32)
    signature: bytes = bounded(max_len=64)


@message("forward_request")
class ForwardRequest(Message):
    """Stateless: hidden states of whole sequences through a sub-span of the server's range."""

    hidden_states: torch.Tensor  # (batch, seq, hidden)
    positions: torch.Tensor  # (batch, seq) int64
    layer_range: LayerRange


@message("forward_response")
class ForwardResponse(Message):
    hidden_states: torch.Tensor  # (batch, seq, hidden)
    receipt: Receipt | None = None


@message("push_target")
class PushTarget(Message):
    """Where a hop delivers its output directly: the next hop's peer, address and session."""

    peer_id: PeerId
    host: str = bounded(max_len=255)
    port: int = bounded(ge=1, le=65535)
    session_id: bytes = bounded(max_len=_SESSION_ID)


@message("inference_open")
class InferenceOpen(Message):
    """First message of an ``inference`` stream: allocate a KV cache for a session.

    Steps are numbered from ``first_step`` (a replacement hop opened during recovery starts
    at the step its replayed history is sent as) and must then come one after another.
    ``dtype`` is the dtype the client sends hidden states in. ``push_from`` is the only peer
    whose ``push`` the session takes (the previous hop's server); None: nobody pushes.
    """

    session_id: bytes = bounded(max_len=_SESSION_ID)
    max_length: int = bounded(ge=1, le=1 << 20)
    batch_size: int = bounded(ge=1, le=1024)
    dtype: DtypeName
    layer_range: LayerRange
    push_to: PushTarget | None = None
    first_step: int = bounded(ge=0, default=0)
    push_from: PeerId | None = None


@message("inference_ready")
class InferenceReady(Message):
    """The server's answer to `InferenceOpen`: the cache is allocated."""

    session_id: bytes = bounded(max_len=_SESSION_ID)
    free_cache_tokens: int = bounded(ge=0)


@message("inference_input")
class InferenceInput(Message):
    """Client to server, on the ``inference`` stream: the input of ``step`` (the server uses
    it unless a push from the previous server delivered the same step first)."""

    step: int = bounded(ge=0)
    hidden_states: torch.Tensor  # (batch, new_tokens, hidden)
    positions: torch.Tensor  # (batch, new_tokens) int64
    # speculative decoding: the cache keeps only its first ``keep`` tokens before this step
    # (the rest were drafts the client rejected); None keeps everything
    keep: int | None = bounded(ge=0, le=1 << 20, default=None)


@message("new_push_target")
class NewPushTarget(Message):
    """Client to server, on the ``inference`` stream: push outputs to ``push_to`` from now on
    (the next hop was replaced or rewired)."""

    push_to: PushTarget


@message("new_pusher")
class NewPusher(Message):
    """Client to server, on the ``inference`` stream: take pushes only from ``push_from``
    from now on (the previous hop was replaced)."""

    push_from: PeerId


@message("inference_step_result")
class InferenceStepResult(Message):
    step: int = bounded(ge=0)
    hidden_states: torch.Tensor  # (batch, new_tokens, hidden)
    receipt: Receipt | None = None


@message("push_request")
class PushRequest(Message):
    """A previous hop's output for one step, delivered into this server's session."""

    session_id: bytes = bounded(max_len=_SESSION_ID)
    step: int = bounded(ge=0)
    hidden_states: torch.Tensor  # (batch, new_tokens, hidden)
    positions: torch.Tensor  # (batch, new_tokens) int64
    keep: int | None = bounded(ge=0, le=1 << 20, default=None)  # as in `InferenceInput`


@message("ping")
class PingEntry(Message):
    """What a server measured of another one (a server of the block after its range): the
    round-trip time of an ``info`` call, and ``tps``, the tokens per second the other one
    delivered through its whole span for a timed one-token ``forward`` (0: not measured)."""

    peer_id: PeerId
    rtt: float = bounded(ge=0.0, le=3600.0)
    tps: float = bounded(ge=0.0, le=1e7, default=0.0)


@message("relay_hop")
class RelayHop(Message):
    """A relay through which a server can be dialed: the relay's peer id and address."""

    peer_id: PeerId
    host: str = bounded(max_len=255)
    port: int = bounded(ge=1, le=65535)


@message("range_move")
class RangeMove(Message):
    """A server's move from one layer range to another (rebalancing), announced with it."""

    from_range: LayerRange
    to_range: LayerRange
    reason: MoveReason
    at: float = bounded(ge=0.0)  # Unix time the server went online on ``to_range``
    gain: float = bounded(ge=0.0, le=1e9)  # bottleneck throughput after / before (0: was 0)


@message("server_announcement")
class ServerAnnouncement(Message):
    """What a server announces in the DHT under ``"<model_id>/block/<i>"`` for each block
    it serves (the record's subkey is its `PeerId`, so the peer id is not repeated here)."""

    host: str = bounded(max_len=255)
    port: int = bounded(ge=1, le=65535)
    layer_range: LayerRange
    state: ServerState
    dtype: str = bounded(max_len=16)
    throughput: float = bounded(ge=0.0)  # tokens per second for the whole span
    free_cache_tokens: int = bounded(ge=0)
    active_sessions: int = bounded(ge=0)
    version: str = bounded(max_len=32)
    next_pings: tuple[PingEntry, ...] = bounded(max_len=8, default=())
    moving_to: LayerRange | None = None  # loading this range to move there (rebalancing)
    last_move: RangeMove | None = None  # the server's latest move, for status pages
    # cache tokens a newcomer within its share could get: free plus reclaimable (borrowed
    # beyond others' shares), at most one peer's share; 0 from servers that predate it
    room_tokens: int = bounded(ge=0, default=0)
    quantization: QuantName = "none"  # how the span's weights are kept (swarm status shows it)
    reachability: Reachability = Reachability.UNKNOWN
    relays: tuple[RelayHop, ...] = bounded(max_len=4, default=())  # dial through these


@message("relay_announcement")
class RelayAnnouncement(Message):
    """A peer that relays circuits and dials back for reachability checks (servers that
    are reachable, and ``swarm dht`` nodes), under `swarm.directory.relay_key`."""

    host: str = bounded(max_len=255)
    port: int = bounded(ge=1, le=65535)
    circuits: int = bounded(ge=0, le=1 << 20)  # open now
    max_circuits: int = bounded(ge=0, le=1 << 20)


@message("dial_back_request")
class DialBackRequest(Message):
    """Please dial ``host:port`` and complete a handshake with me (the caller's `PeerId`)."""

    host: str = bounded(max_len=255)
    port: int = bounded(ge=1, le=65535)


@message("dial_back_response")
class DialBackResponse(Message):
    """What the dial-back found: ``reachable``, ``unreachable``, or ``unknown`` when the
    peer declined to dial that address (it dials only the caller's own host, or, from a
    private or loopback address, other private or loopback addresses)."""

    reachability: Reachability


@message("relay_reserve")
class RelayReserve(Message):
    """First message of a ``relay_reserve`` stream: keep circuits for me (the caller)."""


@message("relay_ready")
class RelayReady(Message):
    """Relay to relayed peer: the reservation holds (sent at once, then as a heartbeat
    every ``heartbeat`` seconds, so the relayed peer notices a relay that went silent)."""

    heartbeat: float = bounded(ge=0.1, le=3600.0)
    # the address the relay sees the relayed peer connect from ("": not known); with the
    # port a NAT keeps, where others may reach a port it opens (`swarm.net.punch`)
    observed: str = bounded(max_len=64, default="")


@message("relay_circuit")
class RelayCircuit(Message):
    """Relay to relayed peer: a dialer waits; connect back with this token. ``dialer``:
    the address the relay sees the dialer connect from ("": not known)."""

    token: bytes = bounded(max_len=32)
    dialer: str = bounded(max_len=64, default="")


@message("punch_address")
class PunchAddress(Message):
    """Where a peer will listen and dial from for a direct connection (`swarm.net.punch`)."""

    host: str = bounded(max_len=255)
    port: int = bounded(ge=1, le=65535)


@message("punch_connect")
class PunchConnect(Message):
    """Each side's first message on a ``hole_punch`` stream (DCUtR's CONNECT): the
    addresses it listens on and dials from for the direct connection."""

    addresses: tuple[PunchAddress, ...] = bounded(max_len=4)


@message("punch_sync")
class PunchSync(Message):
    """The initiator's go (DCUtR's SYNC): the other side dials on receiving it, the
    initiator half the measured round trip later, so both dial at about the same moment."""
