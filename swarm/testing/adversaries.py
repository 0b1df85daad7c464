"""Adversarial peers for tests and benchmarks: the lab's liars (`swarm.lab.liar`) and more.

A spec string names how a server lies (or fails): ``hang`` opens inference sessions, then
never answers a step (nor forward nor push); every other spec is a liar of `swarm.lab.liar`
(``noise:R``, ``skip``, ``zeros``, ``cheat:Q[:KIND]``, ``after:N[:KIND]``,
``other-weights:SEED``, ``collude:SEED``). They attach through ``wrap_handlers`` (the
handler-wrapping seam of `Server`), never through production config.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

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
from swarm.server.handlers import ServerStream, ServingHandlers

__all__ = [
    "HangingHandlers",
    "LyingHandlers",
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


def adversary_wrapper(spec: str) -> Callable[[ServingHandlers], HandlerRegistry]:
    """A ``wrap_handlers`` function for `Server` that makes it behave as ``spec`` says.
    Raises `ConfigError` for an unknown or malformed spec."""
    return hanging if spec == "hang" else liar_wrapper(spec)
