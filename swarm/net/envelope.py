"""The RPC envelope: every message on a channel is ``[kind, call_id, method, body]``.

``kind`` says who sends it and what it is (`Kind`), ``call_id`` names the call in both
directions, ``method`` is set on the messages that start a call, ``body`` is a `Message` map
or nil. Errors travel as `ErrorResponse` bodies (an `ErrorCode` and a safe message) and
become `RemoteError`s here; `error_body` decides what of an exception a peer may see.
"""

from __future__ import annotations

import enum
import re
from typing import Any

from swarm.errors import (
    ConfigError,
    ErrorCode,
    LimitExceeded,
    ProtocolError,
    RemoteError,
    SessionError,
    ShardError,
)
from swarm.net.messages import ErrorResponse, message_from_wire, unpack

__all__ = [
    "FROM_CALLER",
    "INTERNAL_MESSAGE",
    "Kind",
    "error_body",
    "error_code",
    "parse_envelope",
    "remote_error",
]

_METHOD = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


class Kind(enum.IntEnum):
    # caller -> callee
    CALL = 0
    OPEN = 1
    C_DATA = 2
    C_END = 3
    CANCEL = 4
    # callee -> caller
    RESULT = 5
    S_DATA = 6
    S_END = 7
    ERROR = 8
    # caller -> callee, no answer
    NOTIFY = 9


FROM_CALLER = {Kind.CALL, Kind.OPEN, Kind.C_DATA, Kind.C_END, Kind.CANCEL, Kind.NOTIFY}
_KINDS = {k.value: k for k in Kind}


def parse_envelope(data: bytes) -> tuple[Kind, int, str | None, Any]:
    """Check the ``[kind, call_id, method, body]`` array. Raises `ProtocolError`."""
    env = unpack(data)
    if not isinstance(env, list) or len(env) != 4:
        raise ProtocolError("envelope: expected [kind, call_id, method, body]")
    kind, call_id, method, body = env
    if not isinstance(kind, int) or isinstance(kind, bool) or kind not in _KINDS:
        raise ProtocolError(f"envelope.kind: {kind!r:.20} is not a known kind")
    if not isinstance(call_id, int) or isinstance(call_id, bool) or not 0 <= call_id < 2**63:
        raise ProtocolError(f"envelope.call_id: {call_id!r:.20} is not a call id")
    if method is not None and (not isinstance(method, str) or not _METHOD.match(method)):
        raise ProtocolError(f"envelope.method: {method!r:.70} is not a method name")
    if body is not None and not isinstance(body, dict):
        raise ProtocolError("envelope.body: expected a message map or nil")
    return _KINDS[kind], call_id, method, body


# Our own errors whose messages are written for the peer that caused them.
_PEER_FACING: tuple[tuple[type[Exception], ErrorCode], ...] = (
    (ProtocolError, ErrorCode.BAD_REQUEST),
    (ShardError, ErrorCode.BAD_REQUEST),
    (ConfigError, ErrorCode.BAD_REQUEST),
    (SessionError, ErrorCode.SESSION),
)
INTERNAL_MESSAGE = "internal error (details are in the server's log)"
_MAX_MESSAGE = 2048


def remote_error(body: Any) -> RemoteError:
    """The `RemoteError` (`LimitExceeded` for that code) an error body describes."""
    try:
        err = message_from_wire(body, "error", expect=ErrorResponse)
    except ProtocolError as exc:
        return RemoteError(ErrorCode.BAD_REQUEST, f"malformed error reply: {exc}")
    if err.code is ErrorCode.LIMIT_EXCEEDED:
        return LimitExceeded(err.message)
    return RemoteError(err.code, err.message)


def error_code(exc: BaseException) -> ErrorCode:
    """The code a peer is told for ``exc``: `INTERNAL` for anything not meant for it."""
    if isinstance(exc, RemoteError):
        return exc.code
    for kind, code in _PEER_FACING:
        if isinstance(exc, kind):
            return code
    return ErrorCode.INTERNAL


def error_body(exc: BaseException) -> dict[str, Any]:
    """The wire body for a failed call: a code and a safe message, never internal text."""
    code = error_code(exc)
    if isinstance(exc, RemoteError):
        text = exc.message
    elif code is ErrorCode.INTERNAL:
        text = INTERNAL_MESSAGE
    else:
        text = str(exc)
    return ErrorResponse(code, text[:_MAX_MESSAGE]).to_wire()
