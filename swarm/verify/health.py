"""Health monitoring: canary inputs with known answers, and per-server health records.

A canary is a seeded random hidden-state sequence for one layer range; its known answer is
computed from a local reference copy of the weights one layer at a time (each layer is
loaded, run and dropped, so memory stays bounded by one layer whatever range a record
claims). The monitor sends
canaries to each server through the stateless ``forward`` RPC and compares the answers with
the calibrated thresholds of `swarm.verify.compare`.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch
import trio

from swarm.errors import SwarmError
from swarm.net.messages import ForwardRequest
from swarm.net.rpc import RpcConnection
from swarm.net.surface import call_forward
from swarm.shards import ModelConfig, load_span
from swarm.types import LayerRange, PeerId
from swarm.verify.compare import compare, thresholds_for

__all__ = ["Canary", "CanaryResult", "ServerHealth", "make_canaries", "probe"]


@dataclass(frozen=True)
class Canary:
    """An input for `layers` and the answer an honest float32 peer gives."""

    layers: LayerRange
    hidden: torch.Tensor  # (1, seq, hidden)
    positions: torch.Tensor  # (1, seq)
    answer: torch.Tensor  # (1, seq, hidden)


@dataclass(frozen=True)
class CanaryResult:
    ok: bool
    seconds: float
    detail: str


@dataclass
class ServerHealth:
    """What the monitor has seen of one server."""

    peer_id: PeerId
    layers: LayerRange
    probes: int = 0
    reachable: int = 0
    correct: int = 0
    latencies: list[float] = field(default_factory=list)
    last_detail: str = ""

    def add(self, result: CanaryResult | None) -> None:
        self.probes += 1
        if result is None:
            return
        self.reachable += 1
        self.correct += int(result.ok)
        self.latencies.append(result.seconds)
        self.last_detail = result.detail

    @property
    def accuracy(self) -> float:
        return self.correct / self.reachable if self.reachable else 0.0

    @property
    def uptime(self) -> float:
        return self.reachable / self.probes if self.probes else 0.0

    @property
    def median_latency(self) -> float:
        return statistics.median(self.latencies) if self.latencies else float("nan")


def make_canaries(
    path: Path, ranges: list[LayerRange], *, seq: int = 8, seed: int = 0
) -> dict[LayerRange, Canary]:
    """Known answers for each distinct range (float32), each range's input seeded by
    ``seed`` and the range; layers are loaded one at a time (memory: one layer)."""
    config = ModelConfig.from_pretrained(path)
    out: dict[LayerRange, Canary] = {}
    for layers in sorted(set(ranges)):
        gen = torch.Generator().manual_seed(hash((seed, layers.start, layers.stop)) & 0xFFFFFFFF)
        hidden = torch.randn(1, seq, config.hidden_size, generator=gen)  # (1, seq, hidden)
        positions = torch.arange(seq).view(1, seq)
        answer = hidden
        for layer in range(layers.start, layers.stop):
            span = load_span(path, LayerRange(layer, layer + 1))
            with torch.no_grad():
                answer = span(answer, positions)  # (1, seq, hidden)
            del span  # bounded memory: one layer's weights at a time
        out[layers] = Canary(layers, hidden, positions, answer)
    return out


async def probe(
    conn: RpcConnection, canary: Canary, server_dtype: str, timeout: float
) -> CanaryResult:
    """Send one canary through ``forward``; raises `SwarmError` if the call fails."""
    started = trio.current_time()
    request = ForwardRequest(canary.hidden, canary.positions, canary.layers)
    reply = await call_forward(conn, request, timeout=timeout)
    seconds = trio.current_time() - started
    verdict = compare(
        canary.answer,
        reply.hidden_states.float(),
        thresholds_for("float32", server_dtype or "float32"),
    )
    detail = f"rel L2 {verdict.rel_l2:.2e}" if verdict.ok else f"WRONG: rel L2 {verdict.rel_l2:.2e}"
    return CanaryResult(verdict.ok, seconds, detail)


async def probe_safely(
    conn_factory: object, canary: Canary, server_dtype: str, timeout: float
) -> CanaryResult | None:
    """`probe`, or None when the server cannot be reached or fails the call."""
    try:
        conn = await conn_factory()  # type: ignore[operator]
        return await probe(conn, canary, server_dtype, timeout)
    except SwarmError:
        return None
