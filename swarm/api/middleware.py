"""Pure ASGI middleware of the gateway: counting, API keys, Host, body size and time.

`GuardMiddleware` sits outside FastAPI: it counts every request by endpoint and status
(the status of the answer that started, or 499 when the client left first), refuses a
request without a valid ``Authorization: Bearer`` key (401; ``/health`` is open; the
status page may pass the key as ``?key=``, since a browser cannot set the header), refuses
a body over ``max_body_bytes`` (413), whether or not it announced its length (the body is
read whole, bounded, before the app sees the request), and a body that does not arrive
within ``body_timeout_s`` (408). A keyless gateway answers only requests whose ``Host`` is
an IP address, a loopback name or an allowed name (421 otherwise): a page in a local user's
browser that rebinds its own domain name to the gateway's address still sends its own name.
All refusals carry OpenAI's error body.

The key a request was let in with is passed on as a short fingerprint in
``scope["state"]["swarm_key"]`` (None without keys), for per-key shares and receipts.
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

import trio

from swarm.api.errors import ApiError
from swarm.api.http import answering_request
from swarm.api.metrics import GatewayMetrics

__all__ = ["GuardMiddleware", "endpoint_label", "host_allowed", "key_fingerprint"]

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


LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def key_fingerprint(key: bytes) -> str:
    """What identifies an API key in memory (its shares, its receipts): not the key."""
    return hashlib.sha256(b"swarm-api-key:" + key).hexdigest()[:16]


def host_allowed(host_header: bytes, allowed: frozenset[str]) -> bool:
    """Whether a keyless gateway answers a request with this ``Host``: an IP address (a
    rebinding page cannot send one in its own name), a loopback name, or an allowed one."""
    text = host_header.decode("latin-1").strip().lower()
    if text.startswith("["):  # [v6]:port
        name = text[1 : text.find("]")] if "]" in text else text[1:]
    else:
        name = text.rsplit(":", 1)[0] if text.count(":") == 1 else text
    name = name.rstrip(".")
    if not name:
        return False
    if name in LOOPBACK_NAMES or name in allowed or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


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
        body_timeout_s: float = 30.0,
        allowed_hosts: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self.api_keys = tuple(key.encode() for key in api_keys)
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.body_timeout_s = body_timeout_s
        self.allowed_hosts = frozenset(h.lower().rstrip(".") for h in allowed_hosts)

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
            body: bytes = b""
            body_error: ApiError | None = self._too_slow()
            with trio.move_on_after(self.body_timeout_s):
                body, body_error = await self._read_body(receive)  # also when refused
            error = error or body_error
            if error is not None:
                await _send_error(counting_send, error)
                return
            with answering_request():  # the body is whole: not to be closed for others
                await self.app(scope, _replay(body, receive), counting_send)
        finally:
            self.metrics.answered(endpoint_label(scope["path"]), status)

    def _refusal(self, scope: Scope) -> ApiError | None:
        headers = dict(scope["headers"])
        path = scope["path"]
        state = scope.setdefault("state", {})
        state["swarm_key"] = None
        if not self.api_keys:
            if host_allowed(headers.get(b"host", b""), self.allowed_hosts):
                return None
            return ApiError(
                421,
                "this gateway has no API key and answers only requests to "
                "an IP address or a loopback name (Host header); start it with "
                "--allowed-host NAME to be reached by that name",
                code="host_not_allowed",
            )
        if path in OPEN_PATHS:
            return None
        given = headers.get(b"authorization", b"")
        key = given[7:].strip() if given[:7].lower() == b"bearer " else b""
        if not key and (path in KEY_IN_QUERY_PATHS or path.startswith("/static/")):
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            key = query.get("key", [""])[0].encode()
        if any(secrets.compare_digest(key, k) for k in self.api_keys):
            state["swarm_key"] = key_fingerprint(key)
            return None
        why = "invalid API key" if key else "no API key: send Authorization: Bearer KEY"
        return ApiError(
            401,
            why,
            type="authentication_error",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )

    def _too_slow(self) -> ApiError:
        return ApiError(
            408,
            f"the request body did not arrive within {self.body_timeout_s:g} s",
            code="request_timeout",
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
