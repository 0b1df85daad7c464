"""Prometheus metrics of the gateway (``GET /metrics``), on a registry of its own.

Requests by endpoint and status, tokens in and out, time to first token and per-token
latency, generations running, requests queued, generations cancelled because their client
left, what verification did (audits, detections, rollbacks) and the servers the client has
banned. Gauges of the moment
(running, queued, banned) are read when scraped; counters add up as answers finish.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["GatewayMetrics", "RecentRequests"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class RecentRequests:
    """The gateway's own recent figures (status page): requests per minute, median TTFT
    and per-token seconds over the last answers."""

    per_minute: float
    ttft_p50: float | None
    per_token_p50: float | None
    answered: int


class GatewayMetrics:
    """The gateway's metrics; ``running``, ``queued`` and ``banned`` are read at scrape."""

    def __init__(
        self,
        running: Callable[[], int],
        queued: Callable[[], int],
        banned: Callable[[], int],
        clock: Callable[[], float],
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "swarm_api_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.tokens_in = Counter("swarm_api_prompt_tokens", "Prompt tokens", registry=r)
        self.tokens_out = Counter("swarm_api_completion_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram(
            "swarm_api_ttft_seconds", "Time to first token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.per_token = Histogram(
            "swarm_api_token_seconds",
            "Seconds per token after the first",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.audits = Counter("swarm_api_audits", "Verification audits run", registry=r)
        self.detections = Counter("swarm_api_detections", "Peers caught lying", registry=r)
        self.rollbacks = Counter("swarm_api_rollbacks", "Generations rolled back", registry=r)
        self.cancelled = Counter(
            "swarm_api_cancelled_generations",
            "Generations cancelled before their end because the client left",
            registry=r,
        )
        Gauge("swarm_api_active_sessions", "Generations running", registry=r).set_function(running)
        Gauge("swarm_api_queue_length", "Requests waiting", registry=r).set_function(queued)
        Gauge("swarm_api_banned_servers", "Servers the client bans now", registry=r).set_function(
            banned
        )
        self._registry = r
        self._clock = clock
        self._recent: deque[tuple[float, float, float | None]] = deque(maxlen=256)

    def gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """Add a gauge that reads its value from ``read`` when scraped."""
        Gauge(name, documentation, registry=self._registry).set_function(read)

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)

    def answered(self, endpoint: str, status: int) -> None:
        """Count one finished request."""
        self.requests.labels(endpoint, str(status)).inc()

    def generated(self, ttft: float, per_token: list[float]) -> None:
        """Record one finished generation's latencies."""
        self.ttft.observe(ttft)
        for seconds in per_token:
            self.per_token.observe(seconds)
        median = sorted(per_token)[len(per_token) // 2] if per_token else None
        self._recent.append((self._clock(), ttft, median))

    def recent(self, window_s: float = 60.0) -> RecentRequests:
        now = self._clock()
        inside = [entry for entry in self._recent if entry[0] >= now - window_s]
        ttfts = sorted(e[1] for e in inside)
        tokens = sorted(e[2] for e in inside if e[2] is not None)
        return RecentRequests(
            per_minute=len(inside) * 60.0 / window_s,
            ttft_p50=ttfts[len(ttfts) // 2] if ttfts else None,
            per_token_p50=tokens[len(tokens) // 2] if tokens else None,
            answered=len(self._recent),
        )
