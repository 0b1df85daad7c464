"""Pure ASGI middleware of the gateway: counting, API keys, body size.

`GuardMiddleware` sits outside FastAPI: it counts every request by endpoint and status
(the status of the answer that started, or 499 when the client left first), refuses a
request without a valid ``Authorization: Bearer`` key (401; ``/health`` is open; the
status page may pass the key as ``?key=``, since a browser cannot set the header), and
refuses a body over ``max_body_bytes`` (413), whether or not it announced its length (the
body is read whole, bounded, before the app sees the request). All refusals carry OpenAI's
error body.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

from swarm.api.errors import ApiError
from swarm.api.metrics import GatewayMetrics

__all__ = ["GuardMiddleware", "endpoint_label"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/health"})
DRAIN_FACTOR = 16  # a body is read (and dropped) up to this many times the limit
KEY_IN_QUERY_PATHS = frozenset({"/", "/v1/swarm/status"})
_ENDPOINTS = frozenset(
    {
        "/",
        "/health",
        "/metrics",
        "/v1/models",
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/swarm/status",
        "/docs",
        "/openapi.json",
    }
)


def endpoint_label(path: str) -> str:
    """A bounded label for a path (ids and unknown paths folded)."""
    if path in _ENDPOINTS:
        return path
    for prefix in ("/v1/swarm/receipts/", "/v1/models/", "/static/"):
        if path.startswith(prefix):
            return prefix + "*"
    return "other"


class GuardMiddleware:
    """Counting, keys and the body limit around ``app`` (see the module docstring)."""

    def __init__(
        self,
        app: App,
        *,
        api_keys: tuple[str, ...],
        max_body_bytes: int,
        metrics: GatewayMetrics,
    ) -> None:
        self.app = app
        self.api_keys = tuple(key.encode() for key in api_keys)
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 499

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            error = self._refusal(scope)
            body, body_error = await self._read_body(receive)  # also when refused: see below
            error = error or body_error
            if error is not None:
                await _send_error(counting_send, error)
                return
            await self.app(scope, _replay(body, receive), counting_send)
        finally:
            self.metrics.answered(endpoint_label(scope["path"]), status)

    def _refusal(self, scope: Scope) -> ApiError | None:
        headers = dict(scope["headers"])
        path = scope["path"]
        if not self.api_keys or path in OPEN_PATHS:
            return None
        given = headers.get(b"authorization", b"")
        key = given[7:].strip() if given[:7].lower() == b"bearer " else b""
        if not key and (path in KEY_IN_QUERY_PATHS or path.startswith("/static/")):
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            key = query.get("key", [""])[0].encode()
        if any(secrets.compare_digest(key, k) for k in self.api_keys):
            return None
        why = "invalid API key" if key else "no API key: send Authorization: Bearer KEY"
        return ApiError(
            401,
            why,
            type="authentication_error",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )

    def _too_large(self) -> ApiError:
        return ApiError(
            413, f"the request body is over {self.max_body_bytes} bytes", code="request_too_large"
        )

    async def _read_body(self, receive: Receive) -> tuple[bytes, ApiError | None]:
        """The whole request body, read before the app sees the request.

        Past ``max_body_bytes`` the rest is read and dropped (up to `DRAIN_FACTOR` times the
        limit): a server that answers while the client still sends makes the client's
        socket reset, and the client then never reads the answer."""
        parts, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return b"", ApiError(499, "the client closed the request")
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen <= self.max_body_bytes:
                parts.append(chunk)
            done = not message.get("more_body", False)
            if seen > self.max_body_bytes and (done or seen > DRAIN_FACTOR * self.max_body_bytes):
                return b"", self._too_large()
            if done:
                return b"".join(parts), None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands over ``body`` once, then waits on the client (disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_error(send: Send, error: ApiError) -> None:
    body = error.body_bytes()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
