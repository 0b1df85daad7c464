"""Every error a user of swarm can see.

One tree, rooted at :class:`SwarmError`, so ``except SwarmError`` catches everything the
library raises on purpose. Lower-layer exceptions (``OSError``, ``trio`` errors,
``cryptography``'s ``InvalidTag``, ``safetensors`` errors) are translated at the boundary
where they happen and re-raised with ``from exc``.

::

    SwarmError
    ├── ConfigError              bad option or argument given by the user
    ├── IdentityError            key file missing, unreadable, or readable by others
    ├── ShardError               model files: config, architecture, tensors, layer ranges
    ├── TransportError           the connection to a peer failed
    │   ├── ConnectError         could not reach the peer at all
    │   ├── ConnectionClosed     the peer or the local side closed the channel
    │   ├── DeadlineExceeded     a call did not finish before its deadline
    │   └── HandshakeError       the Noise handshake failed
    │       ├── PeerIdMismatch   the peer answering is not the one we dialed
    │       └── SwarmKeyMismatch the peer is not in our private swarm (or we are not in its)
    ├── ProtocolError            a peer sent bytes that do not follow the protocol
    ├── RemoteError              a peer answered a call with an error (carries its type)
    │   └── LimitExceeded        a server limit was reached (sessions, tokens, cache, rate)
    ├── DHTError                 the DHT could not do what was asked
    │   └── RecordError          a DHT record is malformed, forged, expired or too large
    ├── RoutingError             no chain of live peers covers the requested layers
    ├── SessionError             an inference session failed and could not recover
    └── VerificationError        a peer's output failed verification
        └── FraudDetected        a peer was proven to lie (carries the evidence)
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ConnectError",
    "ConnectionClosed",
    "DHTError",
    "DeadlineExceeded",
    "FraudDetected",
    "HandshakeError",
    "IdentityError",
    "LimitExceeded",
    "PeerIdMismatch",
    "ProtocolError",
    "RecordError",
    "RemoteError",
    "RoutingError",
    "SessionError",
    "ShardError",
    "SwarmError",
    "SwarmKeyMismatch",
    "TransportError",
    "VerificationError",
]


class SwarmError(Exception):
    """Root of every error swarm raises on purpose."""


class ConfigError(SwarmError):
    """An option or argument given by the user is invalid."""


class IdentityError(SwarmError):
    """A peer identity key could not be created, read, or trusted."""


class ShardError(SwarmError):
    """A model checkpoint cannot be used: missing files, unsupported config, bad tensors."""


class TransportError(SwarmError):
    """Talking to a peer failed at the connection level."""


class ConnectError(TransportError):
    """The peer could not be reached."""


class ConnectionClosed(TransportError):
    """The channel was closed, by the peer or locally, while it was in use."""


class DeadlineExceeded(TransportError):
    """A call or handshake did not complete before its deadline."""


class HandshakeError(TransportError):
    """The Noise handshake failed: tampered messages, bad signature, wrong keys."""


class PeerIdMismatch(HandshakeError):
    """The peer that answered proved a different identity than the one we dialed."""


class SwarmKeyMismatch(HandshakeError):
    """The peer does not hold the same private-swarm key as we do."""


class ProtocolError(SwarmError):
    """A peer sent a frame or message that does not follow the protocol."""


class RemoteError(SwarmError):
    """A peer answered a call with an error.

    ``remote_type`` is the name of the exception class on the remote side (for example
    ``"ShardError"``), ``message`` its text.
    """

    def __init__(self, remote_type: str, message: str) -> None:
        super().__init__(f"{remote_type}: {message}")
        self.remote_type = remote_type
        self.message = message


class LimitExceeded(RemoteError):
    """A server refused work because one of its limits was reached.

    The client can act on it: pick another server, wait, or shorten the request.
    """


class DHTError(SwarmError):
    """The DHT could not complete an operation."""


class RecordError(DHTError):
    """A DHT record is malformed, badly signed, expired, or too large to store."""


class RoutingError(SwarmError):
    """No chain of reachable peers covers the layers the client needs."""


class SessionError(SwarmError):
    """An inference session failed and could not be recovered."""


class VerificationError(SwarmError):
    """A peer's output did not pass verification."""


class FraudDetected(VerificationError):
    """A peer was proven to have returned a wrong result; ``evidence`` holds the proof."""

    def __init__(self, message: str, evidence: object = None) -> None:
        super().__init__(message)
        self.evidence = evidence
