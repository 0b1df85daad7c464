"""The one boundary where errors become HTTP answers with OpenAI's error body.

Every error a caller sees is ``{"error": {"message", "type", "code", "param"}}`` with a
status that says whose fault it was: 4xx for the request (`ApiError` raised by the
gateway, `ConfigError` from the library), 429 when the gateway is full, 502/503 when the
swarm could not answer. An unexpected exception is logged with its traceback and answered
with a 500 that says nothing of it.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from swarm.errors import (
    ConfigError,
    DHTError,
    LimitExceeded,
    RoutingError,
    SwarmError,
    TransportError,
    VerificationError,
)

__all__ = ["ApiError", "error_body", "error_from_exception"]

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An HTTP error with an OpenAI error body; ``headers`` are added to the answer."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param)

    def body_bytes(self) -> bytes:
        return json.dumps(self.body()).encode()


def error_body(
    message: str, type: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error body."""
    return {"error": {"message": message, "type": type, "code": code, "param": param}}


def error_from_exception(exc: BaseException) -> ApiError:
    """The HTTP answer for an exception raised while serving a request."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ConfigError):
        return ApiError(400, str(exc))
    if isinstance(exc, RoutingError):
        return ApiError(
            503, f"the swarm cannot run the model now: {exc}", type="server_error", code="no_route"
        )
    if isinstance(exc, LimitExceeded):
        return ApiError(
            503, f"the servers are at their limits: {exc}", type="server_error", code="swarm_busy"
        )
    if isinstance(exc, VerificationError):
        return ApiError(
            502, f"verification failed: {exc}", type="server_error", code="verification_failed"
        )
    if isinstance(exc, TransportError | DHTError):
        return ApiError(
            502, f"the swarm did not answer: {exc}", type="server_error", code="swarm_unreachable"
        )
    if isinstance(exc, SwarmError):
        return ApiError(
            502, f"the swarm failed to answer: {exc}", type="server_error", code="swarm_error"
        )
    log.error("unexpected error while serving a request", exc_info=exc)
    return ApiError(
        500, "internal error of the gateway (logged)", type="server_error", code="internal_error"
    )
