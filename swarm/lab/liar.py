"""The demo's liar: a server whose outputs are rewritten, to watch verification catch it.

``swarm demo --liar SPEC`` starts one server through `liar_command` (the lab's entry point
``python -m swarm_cli.lab_serve``, never a flag of ``swarm serve``), which serves the
honest handlers wrapped by `liar_wrapper` (the handler-wrapping seam of `Server`). Tests add
further adversaries in `swarm.testing.adversaries`. A spec string names how it lies:

- ``noise:R``: adds Gaussian noise of relative size R to every output;
- ``skip``: returns the input unchanged (does not run its layers);
- ``zeros``: returns zeros;
- ``cheat:Q[:KIND]``: lies as KIND (default ``noise:0.01``) on each answer with probability Q;
- ``after:N[:KIND]``: answers honestly N times (steps and forwards), then lies as KIND;
- ``other-weights:SEED``: serves weights perturbed (relative size 5e-2, seeded) after loading,
  under the same model id;
- ``collude:SEED``: adds noise (relative 5e-2) drawn from SEED and each position's input
  bytes, so two colluders with the same SEED return the same wrong answer, whether a
  position comes in a step or in a forward of the whole history.

They exist so verification and recovery can be shown to work, nowhere else.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable

import torch

from swarm.errors import ConfigError
from swarm.net.methods import HandlerRegistry
from swarm.server.compute import Priority
from swarm.server.handlers import ServingHandlers
from swarm.shards.cache import KVCache
from swarm.shards.span import Span

__all__ = [
    "LIAR_ENTRY",
    "LyingHandlers",
    "corruptor",
    "liar_command",
    "liar_wrapper",
    "perturb_weights",
]

Corrupt = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def corruptor(spec: str, *, seed: int = 0) -> Corrupt:
    """The output rewrite for a lying spec (every spec above except ``hang`` and
    ``other-weights``). Raises `ConfigError` for an unknown or malformed spec."""
    kind, _, arg = spec.partition(":")
    gen = torch.Generator().manual_seed(seed)
    if kind == "skip":
        return lambda hidden, out: hidden.to(out.dtype)
    if kind == "zeros":
        return lambda hidden, out: torch.zeros_like(out)
    if kind == "noise":
        return _noise(_number(spec, arg, float), gen)
    if kind == "cheat":
        q, _, inner = arg.partition(":")
        return _sometimes(_number(spec, q, float), corruptor(inner or "noise:0.01", seed=seed), gen)
    if kind == "after":
        n, _, inner = arg.partition(":")
        return _after(_number(spec, n, int), corruptor(inner or "noise:0.01", seed=seed))
    if kind == "collude":
        return _collude(_number(spec, arg, int))
    raise ConfigError(
        f"unknown liar {spec!r}; use noise:R, skip, zeros, cheat:Q[:KIND], "
        "after:N[:KIND], other-weights:SEED or collude:SEED"
    )


def _number(spec: str, text: str, kind: type[float] | type[int]) -> float:
    try:
        return kind(text)
    except ValueError as exc:
        raise ConfigError(f"adversary {spec!r} needs a number after its name") from exc


def _noise(scale: float, gen: torch.Generator) -> Corrupt:
    def noise(hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        delta = torch.randn(out.shape, generator=gen).to(out.dtype)
        size = (scale * out.float().norm() / delta.float().norm()).to(out.dtype)
        noisy: torch.Tensor = out + delta * size
        return noisy

    return noise


def _sometimes(q: float, inner: Corrupt, gen: torch.Generator) -> Corrupt:
    def maybe(hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return inner(hidden, out) if float(torch.rand((), generator=gen)) < q else out

    return maybe


def _after(n: float, inner: Corrupt) -> Corrupt:
    calls = [0]

    def later(hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return out if calls[0] <= n else inner(hidden, out)

    return later


def _collude(seed: float) -> Corrupt:
    def shared(hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        rows = hidden.float().contiguous().view(-1, hidden.shape[-1])  # (batch*seq, hidden)
        deltas = []
        for row in rows:
            digest = hashlib.sha256(f"{seed}".encode() + row.numpy().tobytes()).digest()
            g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
            deltas.append(torch.randn(hidden.shape[-1], generator=g))
        delta = torch.stack(deltas).view(out.shape)  # (batch, seq, hidden)
        scale = 5e-2 * out.float().norm(dim=-1, keepdim=True) / delta.norm(dim=-1, keepdim=True)
        lied: torch.Tensor = (out.float() + delta * scale).to(out.dtype)
        return lied

    return shared


def perturb_weights(span: torch.nn.Module, seed: int, scale: float = 5e-2) -> None:
    """Add seeded noise of relative size ``scale`` to every weight of ``span`` (in place)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in span.parameters():
            delta = torch.randn(param.shape, generator=gen).to(param.dtype)
            param.add_(delta * scale * param.float().std().to(param.dtype))


class LyingHandlers(ServingHandlers):
    """The honest server's handlers, whose every output (returned, pushed, signed in its
    receipts) is rewritten by ``corrupt(input, output)``."""

    def __init__(
        self, honest: ServingHandlers, corrupt: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    ) -> None:
        super().__init__(
            honest.config, honest.span, honest.state, honest.sessions, honest.queue, honest.pool
        )
        self._corrupt = corrupt

    async def compute(
        self,
        span: Span,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None,
        priority: Priority,
    ) -> torch.Tensor:
        out = await super().compute(span, hidden, positions, cache, priority)
        return self._corrupt(hidden, out)


def liar_wrapper(spec: str) -> Callable[[ServingHandlers], HandlerRegistry]:
    """A ``wrap_handlers`` function for `Server` that makes it lie as ``spec`` says.
    Raises `ConfigError` for an unknown or malformed spec (now, not at the first step)."""
    kind, _, arg = spec.partition(":")
    if kind == "other-weights":
        seed = int(_number(spec, arg, int))

        def other(handlers: ServingHandlers) -> HandlerRegistry:
            perturb_weights(handlers.span, seed)
            return handlers.registry()

        return other
    corrupt = corruptor(spec)  # validates the spec now, not at the first step

    def lying(honest: ServingHandlers) -> HandlerRegistry:
        return LyingHandlers(honest, corrupt).registry()

    return lying


LIAR_ENTRY = "swarm_cli.lab_serve"  # the module that serves a liar: ``--liar SPEC`` + serve's


def liar_command(spec: str, *serve_args: str) -> list[str]:
    """The argv of a lying server: ``swarm serve``'s arguments, run by the lab's entry point."""
    return [sys.executable, "-m", LIAR_ENTRY, "--liar", spec, *serve_args]
