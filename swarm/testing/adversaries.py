"""Adversarial peers for tests, benchmarks and ``swarm serve --testing-adversary``.

A spec string names how a server lies (or fails):

- ``hang``: opens inference sessions, then never answers a step (nor forward nor push);
- ``noise:R``: adds Gaussian noise of relative size R to every output;
- ``skip``: returns the input unchanged (does not run its layers);
- ``zeros``: returns zeros.

Never use these outside tests: they exist so verification and recovery can be shown to work.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import trio

from swarm.errors import ConfigError
from swarm.net.messages import InferenceOpen, InferenceReady
from swarm.net.rpc import CallContext, RpcStream, stream_handler
from swarm.server.handlers import ServingHandlers

__all__ = ["HangingHandlers", "adversary_wrapper", "corruptor"]

Corrupt = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def corruptor(spec: str, *, seed: int = 0) -> Corrupt:
    """The output rewrite for a lying spec (``noise:R``, ``skip``, ``zeros``)."""
    kind, _, arg = spec.partition(":")
    gen = torch.Generator().manual_seed(seed)
    if kind == "skip":
        return lambda hidden, out: hidden.to(out.dtype)
    if kind == "zeros":
        return lambda hidden, out: torch.zeros_like(out)
    if kind == "noise":
        try:
            scale = float(arg)
        except ValueError as exc:
            raise ConfigError(
                f"noise adversary needs a size, e.g. noise:0.01; got {spec!r}"
            ) from exc

        def noise(hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            delta = torch.randn(out.shape, generator=gen).to(out.dtype)
            size = (scale * out.float().norm() / delta.float().norm()).to(out.dtype)
            noisy: torch.Tensor = out + delta * size
            return noisy

        return noise
    raise ConfigError(f"unknown adversary {spec!r}; use hang, noise:R, skip or zeros")


class HangingHandlers:
    """Serves ``info`` honestly, accepts every session and step, and never answers."""

    def __init__(self, honest: ServingHandlers) -> None:
        self._honest = honest
        self.rpc_info = honest.rpc_info

    @stream_handler
    async def rpc_inference(self, stream: RpcStream, ctx: CallContext) -> None:
        opened = await stream.receive(InferenceOpen)
        await stream.send(InferenceReady(opened.session_id, self._honest.sessions.free_tokens))
        await trio.sleep_forever()

    async def rpc_forward(self, request: object, ctx: CallContext) -> object:
        await trio.sleep_forever()

    async def rpc_push(self, request: object, ctx: CallContext) -> object:
        await trio.sleep_forever()


def adversary_wrapper(spec: str) -> Callable[[ServingHandlers], object]:
    """A ``wrap_handlers`` function for `Server` that makes it behave as ``spec`` says."""
    if spec == "hang":
        return HangingHandlers
    corrupt = corruptor(spec)  # validates the spec now, not at the first step

    def wrap(handlers: ServingHandlers) -> object:
        handlers.corrupt = corrupt
        return handlers

    return wrap
