"""What the status page shows (``GET /v1/swarm/status``, ``GET /``) and ``GET /health``.

Everything comes from the gateway's latest view of the servers (refreshed every
``refresh_s``), the client's pings and bans, the canary probes and the gateway's own
counters; building it costs no network call.
"""

from __future__ import annotations

import time
from typing import Any

from swarm import __version__
from swarm.api.gateway import Gateway
from swarm.types import ServerState

__all__ = ["health_report", "status_report"]


def health_report(gateway: Gateway) -> tuple[int, dict[str, Any]]:
    """200 when every block is covered by an online server, else 503 naming the missing."""
    missing = gateway.missing()
    body: dict[str, Any] = {
        "status": "ok" if not missing else "unavailable",
        "model": gateway.facts.name,
        "num_blocks": gateway.num_layers,
        "missing_blocks": missing,
        "online_servers": sum(s.state == ServerState.ONLINE for s in gateway.servers),
    }
    return (200 if not missing else 503), body


def status_report(gateway: Gateway) -> dict[str, Any]:
    """The status page's data: model, gateway figures, coverage, and every server."""
    facts, admission = gateway.facts, gateway.admission.statistics()
    recent = gateway.metrics.recent()
    banned = gateway.banned()
    pings = gateway.model.directory.pings
    num_layers = gateway.num_layers
    servers = []
    for view in sorted(gateway.servers, key=lambda s: (s.layers.start, s.layers.stop, s.address)):
        health = gateway.health(view.peer_id)
        ping = pings.get(view.peer_id)
        servers.append(
            {
                "peer": str(view.peer_id),
                "short": view.peer_id.short(),
                "address": view.address,
                "path": view.path,
                "upgraded": view.upgraded,
                "reachability": str(view.reachability),
                "state": str(view.state),
                "start": view.layers.start,
                "stop": view.layers.stop,
                "throughput": round(view.throughput, 1),
                "active_sessions": view.active_sessions,
                "free_cache_tokens": view.free_cache_tokens,
                "dtype": view.dtype,
                "quantization": view.quantization,
                "ping_ms": round(ping * 1e3, 2) if ping is not None else None,
                "banned": view.peer_id in banned,
                "canary": None
                if health is None
                else {
                    "probes": health.probes,
                    "reachable": health.reachable,
                    "correct": health.correct,
                    "median_ms": round(health.median_latency * 1e3, 2)
                    if health.latencies
                    else None,
                    "last": health.last_detail,
                },
            }
        )
    coverage = [0] * num_layers
    for view in gateway.servers:
        if view.state == ServerState.ONLINE:
            for block in range(view.layers.start, min(view.layers.stop, num_layers)):
                coverage[block] += 1
    return {
        "model": {
            "name": facts.name,
            "model_id": facts.model_id,
            "num_blocks": num_layers,
            "chat": facts.template is not None,
            "max_length": facts.max_length,
        },
        "gateway": {
            "version": __version__,
            "uptime_s": round(time.time() - gateway.started, 1),
            "default_verify": facts.default_verify,
            "running": admission.running,
            "queued": admission.queued,
            "max_concurrent": admission.max_concurrent,
            "queue": admission.queue,
            "rejected": admission.rejected,
            "requests_per_minute": round(recent.per_minute, 1),
            "ttft_p50_ms": _ms(recent.ttft_p50),
            "per_token_p50_ms": _ms(recent.per_token_p50),
            "answered": recent.answered,
            "refreshed_at": gateway.refreshed_at,
            "refresh_error": gateway.refresh_error,
        },
        "health": {"ok": not gateway.missing(), "missing_blocks": gateway.missing()},
        "coverage": coverage,
        "servers": servers,
    }


def _ms(seconds: float | None) -> float | None:
    return round(seconds * 1e3, 1) if seconds is not None else None
