"""Every error a user of swarm can see.

One tree, rooted at :class:`SwarmError`, so ``except SwarmError`` catches everything the
library raises on purpose. Lower-layer exceptions (``OSError``, ``trio`` errors,
``cryptography``'s ``InvalidTag``, ``safetensors`` errors) are translated at the boundary
where they happen and re-raised with ``from exc``, through `map_exceptions` (httpcore's
model: one mapping per boundary instead of an ``except`` block at every call site).

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
    ├── RemoteError              a peer answered a call with an error (an `ErrorCode`)
    │   └── LimitExceeded        a server limit was reached (sessions, tokens, cache, rate)
    ├── DHTError                 the DHT could not do what was asked
    │   └── RecordError          a DHT record is malformed, forged, expired or too large
    ├── RoutingError             no chain of live peers covers the requested layers
    ├── SessionError             an inference session failed and could not recover
    └── VerificationError        a peer's output failed verification
        └── FraudDetected        a peer was proven to lie (carries the evidence)
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import TracebackType

__all__ = [
    "ConfigError",
    "ConnectError",
    "ConnectionClosed",
    "DHTError",
    "DeadlineExceeded",
    "ErrorCode",
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
    "map_exceptions",
    "unwrap_group",
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


class ErrorCode(enum.StrEnum):
    """Why a remote call failed: the closed set of codes that cross the wire.

    A server answers with one of these and a message written for the peer; exception class
    names, tracebacks and internal texts stay in the server's log.
    """

    BAD_REQUEST = "bad_request"  # breaks the protocol or asks what no server could do
    LIMIT_EXCEEDED = "limit_exceeded"  # sessions, cache, queue, rate: try elsewhere or later
    SESSION = "session"  # unknown or expired session, a step out of order or late
    FORBIDDEN = "forbidden"  # the caller may not do this (a push from a peer not named)
    UNAVAILABLE = "unavailable"  # draining or shutting down: takes no new work
    NOT_FOUND = "not_found"  # no such method
    INTERNAL = "internal"  # a failure inside the server; details only in its log


class RemoteError(SwarmError):
    """A peer answered a call with an error: ``code`` (an `ErrorCode`) and ``message``."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message


class LimitExceeded(RemoteError):
    """A server refused work because one of its limits was reached.

    The client can act on it: pick another server, wait, or shorten the request.
    """

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.LIMIT_EXCEEDED, message)


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


def unwrap_group(exc: BaseException) -> BaseException:
    """The one exception that matters inside (nested) exception groups, else ``exc``.

    A group with one member is replaced by it, recursively. Of a group with several, a
    ``KeyboardInterrupt`` wins (the user's Ctrl-C, which the channels it broke must not turn
    into a failure that recovery retries), then the first leaf that is a `SwarmError`, else
    the first `Exception` (never a cancellation such as trio's ``Cancelled``, which is a
    ``BaseException``): the others are side effects of the same failure, siblings cancelled
    or broken by it. A group of cancellations only is returned as it is. The one place swarm
    unwraps the groups that nurseries raise.
    """
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    leaves = [unwrap_group(inner) for inner in exc.exceptions]
    for wanted in (KeyboardInterrupt, SwarmError, Exception):
        for leaf in leaves:
            if isinstance(leaf, wanted) and not isinstance(leaf, BaseExceptionGroup):
                return leaf
    return exc


class map_exceptions:  # a function in use (``with map_exceptions(...):``), so lower case
    """Translate a lower layer's exceptions at a boundary: an exception that is an instance
    of a key (the first that matches) is re-raised as its value, with the message
    ``"<what>: <exc>"`` and ``from exc``; anything else passes through unchanged.

    ::

        with map_exceptions({OSError: ConnectError}, f"cannot connect to {host}:{port}"):
            stream = await trio.open_tcp_stream(host, port)

    (A plain class, not a ``@contextmanager`` generator: it wraps every socket receive,
    and costs three Python calls where a generator costs seven.)
    """

    __slots__ = ("mapping", "what")

    def __init__(
        self, mapping: Mapping[type[BaseException], type[SwarmError]], what: str = ""
    ) -> None:
        self.mapping = mapping
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:  # never swallows: an exception passes through or is translated
        if not isinstance(exc, Exception):
            return
        for source, target in self.mapping.items():
            if isinstance(exc, source):
                what = self.what
                raise target(f"{what}: {exc}" if what else str(exc)) from exc
