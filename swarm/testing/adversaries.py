"""Adversarial peers for tests and benchmarks: the lab's liars (`swarm.lab.liar`) and more.

A spec string names how a server lies (or fails): ``hang`` opens inference sessions, then
never answers a step (nor forward nor push); ``slow:SECONDS[:FACTOR]`` answers honestly but
waits before every computation, SECONDS for the first and FACTOR times longer for each
next (a server that is steadily slow, or one that slows down); ``slow-every:N:SECONDS``
answers honestly and waits SECONDS before every Nth computation only (a server that
hiccups now and then); every other spec is a liar
of `swarm.lab.liar`
(``noise:R``, ``skip``, ``zeros``, ``cheat:Q[:KIND]``, ``after:N[:KIND]``,
``other-weights:SEED``, ``collude:SEED``). They attach through ``wrap_handlers`` (the
handler-wrapping seam of `Server`), never through production config.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import trio

from swarm.errors import ConfigError
from swarm.lab.liar import LyingHandlers, corruptor, liar_wrapper, perturb_weights
from swarm.net.messages import (
    ForwardRequest,
    ForwardResponse,
    InferenceOpen,
    InferenceReady,
    PushRequest,
)
from swarm.net.methods import HandlerRegistry
from swarm.net.rpc import CallContext
from swarm.net.surface import FORWARD, INFERENCE, INFO, PUSH, server_registry
from swarm.server.compute import Priority
from swarm.server.handlers import ServerStream, ServingHandlers
from swarm.shards import KVCache, Span

__all__ = [
    "HangingHandlers",
    "LyingHandlers",
    "SlowingHandlers",
    "StutteringHandlers",
    "adversary_wrapper",
    "corruptor",
    "hanging",
    "perturb_weights",
]


class HangingHandlers:
    """Serves ``info`` honestly, accepts every session and step, and never answers."""

    def __init__(self, honest: ServingHandlers) -> None:
        self._honest = honest

    def registry(self) -> HandlerRegistry:
        return server_registry(
            [
                INFO.bind(self._honest.rpc_info),
                FORWARD.bind(self.rpc_forward),
                INFERENCE.bind(self.rpc_inference),
                PUSH.bind(self.rpc_push),
            ]
        )

    async def rpc_inference(self, stream: ServerStream, ctx: CallContext) -> None:
        opened = await stream.receive(InferenceOpen)
        await stream.send(InferenceReady(opened.session_id, self._honest.sessions.free_tokens))
        await trio.sleep_forever()

    async def rpc_forward(self, request: ForwardRequest, ctx: CallContext) -> ForwardResponse:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def rpc_push(self, request: PushRequest, ctx: CallContext) -> None:
        await trio.sleep_forever()


def hanging(honest: ServingHandlers) -> HandlerRegistry:
    """A ``wrap_handlers`` function: `HangingHandlers`."""
    return HangingHandlers(honest).registry()


class _DelayingHandlers(ServingHandlers):
    """The honest server's handlers, each computation started ``next_delay()`` seconds late
    (honest answers, only late)."""

    def __init__(self, honest: ServingHandlers) -> None:
        super().__init__(
            honest.config, honest.span, honest.state, honest.sessions, honest.queue, honest.pool
        )

    def next_delay(self) -> float:
        raise NotImplementedError

    async def compute(
        self,
        span: Span,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None,
        priority: Priority,
    ) -> torch.Tensor:
        delay = self.next_delay()
        if delay:
            await trio.sleep(delay)
        return await super().compute(span, hidden, positions, cache, priority)


class SlowingHandlers(_DelayingHandlers):
    """The honest server's handlers, each computation delayed: ``delay_s`` seconds for the
    first, ``factor`` times the previous delay for each next (1: steadily slow)."""

    def __init__(self, honest: ServingHandlers, delay_s: float, factor: float = 1.0) -> None:
        super().__init__(honest)
        self.delay_s = delay_s
        self.factor = factor

    def next_delay(self) -> float:
        delay, self.delay_s = self.delay_s, self.delay_s * self.factor
        return delay


def slowing(spec: str) -> Callable[[ServingHandlers], HandlerRegistry]:
    """A ``wrap_handlers`` function for ``slow:SECONDS[:FACTOR]`` (`SlowingHandlers`).
    Raises `ConfigError` for a malformed spec."""
    _, _, args = spec.partition(":")
    parts = args.split(":")
    try:
        delay, factor = float(parts[0]), float(parts[1]) if len(parts) > 1 else 1.0
    except ValueError as exc:
        raise ConfigError(f"adversary {spec!r}: use slow:SECONDS[:FACTOR]") from exc
    if len(parts) > 2 or not (delay >= 0 and factor > 0):
        raise ConfigError(f"adversary {spec!r}: use slow:SECONDS[:FACTOR], both positive")

    def wrap(honest: ServingHandlers) -> HandlerRegistry:
        return SlowingHandlers(honest, delay, factor).registry()

    return wrap


class StutteringHandlers(_DelayingHandlers):
    """The honest server's handlers, every ``every``-th computation (the ``every``-th,
    ``2 * every``-th, ...) delayed by ``delay_s`` seconds, the others not at all."""

    def __init__(self, honest: ServingHandlers, every: int, delay_s: float) -> None:
        super().__init__(honest)
        self.every = every
        self.delay_s = delay_s
        self.computations = 0

    def next_delay(self) -> float:
        self.computations += 1
        return self.delay_s if self.computations % self.every == 0 else 0.0


def stuttering(spec: str) -> Callable[[ServingHandlers], HandlerRegistry]:
    """A ``wrap_handlers`` function for ``slow-every:N:SECONDS`` (`StutteringHandlers`).
    Raises `ConfigError` for a malformed spec."""
    usage = f"adversary {spec!r}: use slow-every:N:SECONDS, N >= 1 and SECONDS >= 0"
    parts = spec.split(":")[1:]
    try:
        every, delay = int(parts[0]), float(parts[1])
    except (ValueError, IndexError) as exc:
        raise ConfigError(usage) from exc
    if len(parts) != 2 or every < 1 or not delay >= 0:
        raise ConfigError(usage)

    def wrap(honest: ServingHandlers) -> HandlerRegistry:
        return StutteringHandlers(honest, every, delay).registry()

    return wrap


def adversary_wrapper(spec: str) -> Callable[[ServingHandlers], HandlerRegistry]:
    """A ``wrap_handlers`` function for `Server` that makes it behave as ``spec`` says.
    Raises `ConfigError` for an unknown or malformed spec."""
    if spec == "hang":
        return hanging
    if spec.startswith("slow:"):
        return slowing(spec)
    if spec.startswith("slow-every:"):
        return stuttering(spec)
    return liar_wrapper(spec)
