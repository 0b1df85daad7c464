"""The RPC envelope: every message on a channel is ``[kind, call_id, method, body]``.

``kind`` says who sends it and what it is (`Kind`), ``call_id`` names the call in both
directions, ``method`` is set on the messages that start a call, ``body`` is a `Message` map
or nil. Errors travel as `ErrorResponse` bodies and become typed `RemoteError`s here.
"""

from __future__ import annotations

import enum
import re
from typing import Any

from swarm.errors import LimitExceeded, ProtocolError, RemoteError
from swarm.net.messages import ErrorResponse, message_from_wire, unpack

__all__ = ["FROM_CALLER", "Kind", "error_body", "parse_envelope", "remote_error"]

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


def remote_error(body: Any) -> RemoteError:
    try:
        err = message_from_wire(body, "error", expect=ErrorResponse)
    except ProtocolError as exc:
        return RemoteError("ProtocolError", f"malformed error reply: {exc}")
    cls = LimitExceeded if err.remote_type == "LimitExceeded" else RemoteError
    return cls(err.remote_type, err.message)


def error_body(exc: BaseException) -> dict[str, Any]:
    remote_type = exc.remote_type if isinstance(exc, RemoteError) else type(exc).__name__
    text = exc.message if isinstance(exc, RemoteError) else str(exc)
    return ErrorResponse(remote_type[:128], text[:8192]).to_wire()
