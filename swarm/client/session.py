"""`InferenceSession`: one generation's pipeline through a chain of servers, with recovery.

The session plans a route, opens one ``inference`` stream per hop and wires each hop's push
target to the next hop (`swarm.client.opening`). A step sends its input to the first hop;
with push on, the servers pass the hidden states along themselves and the client only
collects every hop's output (sending hop k+1's input itself when its result is
``push_grace`` late); with push off, the client relays every hop's input. Each hop's inputs
are kept (its history, `swarm.client.hops`).

When a hop fails (its stream errors or closes, or it misses ``step_timeout``), the session
bans the server, re-plans that hop's layers without banned servers, opens replacement
sessions starting at the last finished step, replays the history there as one multi-token
step, points the previous hop's pushes at the replacement and redoes the current step
(`swarm.client.recovery`). When a hop is only late (past its adaptive deadline), the same
replacement is raced against it and the first answer kept (`swarm.client.hedging`). The
caller sees the same hidden states as if nothing had gone wrong.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass

import torch
import trio

from swarm.client.bans import BanList
from swarm.client.config import ClientConfig
from swarm.client.discovery import ServerDirectory
from swarm.client.hedging import HedgeRecord, step_hop
from swarm.client.hops import HopFailure, HopState, close_hop
from swarm.client.opening import HopOpener
from swarm.client.recovery import open_replacement, splice
from swarm.client.routing import Hop
from swarm.errors import SessionError
from swarm.net.messages import Receipt
from swarm.net.pool import ConnectionPool
from swarm.types import LayerRange, PeerId

__all__ = ["HopFailure", "HopProgress", "InferenceSession", "SessionStatistics"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HopProgress:
    """Where one hop of a session stands after its last step (what verification reads)."""

    hop: Hop
    steps: int  # entries in its history (a replay counts as one)
    last_input: tuple[torch.Tensor, torch.Tensor] | None  # (batch, n, hidden), (batch, n)
    last_receipt: Receipt | None  # the server's signed receipt for its last step
    last_seconds: float | None  # how long its last step took


@dataclass(frozen=True)
class SessionStatistics:
    steps: int
    recoveries: int
    failures: tuple[str, ...]
    hop_seconds: tuple[tuple[float, ...], ...]  # per hop of the current route, per entry
    hedges: tuple[HedgeRecord, ...] = ()  # every hedged hop step, in order


class InferenceSession:
    """A pipeline through servers covering ``layers``; make one with `InferenceSession.open`.

    `step` takes hidden states ``(batch, new_tokens, hidden)`` and positions ``(batch,
    new_tokens)`` and returns the last hop's output as float32. Not safe for concurrent
    `step` calls (steps are ordered by nature).
    """

    def __init__(
        self,
        pool: ConnectionPool,
        directory: ServerDirectory,
        config: ClientConfig,
        layers: LayerRange,
        max_length: int,
        batch_size: int,
        bans: BanList,
        rng: random.Random,
        excluded: Collection[PeerId] = (),
    ) -> None:
        self.config = config
        self.layers = layers
        self.max_length = max_length
        self.batch_size = batch_size
        self.bans = bans
        self.opener = HopOpener(
            pool,
            directory,
            config,
            max_length=max_length,
            batch_size=batch_size,
            bans=bans,
            rng=rng,
            excluded=excluded,
        )
        self._hops: list[HopState] = []
        self.step_count = 0
        self.recoveries = 0
        self.hedges: list[HedgeRecord] = []
        self.routes: list[list[Hop]] = []

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        pool: ConnectionPool,
        directory: ServerDirectory,
        config: ClientConfig,
        *,
        layers: LayerRange,
        max_length: int,
        batch_size: int = 1,
        bans: BanList | None = None,
        rng: random.Random | None = None,
        excluded: Collection[PeerId] = (),
    ) -> AsyncIterator[InferenceSession]:
        """Plan a route and open every hop; end every hop's stream on exit.

        ``excluded`` peers are never routed to (peers banned by verification).
        Raises `RoutingError` if no route covers ``layers``, `SessionError` if more than
        ``config.max_open_retries`` servers failed while opening.
        """
        bans = bans or BanList(config.ban_base_s, config.ban_backoff, config.ban_max_s)
        session = cls(
            pool,
            directory,
            config,
            layers,
            max_length,
            batch_size,
            bans,
            rng or random.Random(),
            excluded,
        )
        try:
            session._hops = await session.opener.open_range(layers, 0, None, None)
            session.routes.append(session.route)
            yield session
        finally:
            with trio.CancelScope(shield=True):
                await session.aclose()

    @property
    def route(self) -> list[Hop]:
        """The hops in use now."""
        return [state.hop for state in self._hops]

    @property
    def failures(self) -> list[str]:
        """Every hop failure this session banned a server for, oldest first."""
        return self.opener.failures

    def hop_history(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hop ``k``'s whole history: inputs ``(batch, T, hidden)``, positions ``(batch, T)``
        and the outputs it returned ``(batch, T, hidden)``, in the order they were sent."""
        state = self._hops[k]
        x = torch.cat([h.float() for h, _ in state.inputs], dim=1)  # (batch, T, hidden)
        pos = torch.cat([p for _, p in state.inputs], dim=1)  # (batch, T)
        out = torch.cat([o.float() for o in state.outputs], dim=1)  # (batch, T, hidden)
        return x, pos, out

    def hop_progress(self, k: int) -> HopProgress:
        """Hop ``k``'s last step: its input, receipt and time (see `hop_history` for all)."""
        state = self._hops[k]
        return HopProgress(
            hop=state.hop,
            steps=len(state.inputs),
            last_input=state.inputs[-1] if state.inputs else None,
            last_receipt=state.receipts[-1] if state.receipts else None,
            last_seconds=state.seconds[-1] if state.seconds else None,
        )

    def statistics(self) -> SessionStatistics:
        return SessionStatistics(
            steps=self.step_count,
            recoveries=self.recoveries,
            failures=tuple(self.failures),
            hop_seconds=tuple(tuple(state.seconds) for state in self._hops),
            hedges=tuple(self.hedges),
        )

    async def aclose(self) -> None:
        """End every hop's stream (quietly: a dead hop has nothing left to close)."""
        hops, self._hops = self._hops, []
        for state in hops:
            await close_hop(state)

    # ---- steps ----

    async def step(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Run one step through every hop; returns ``(batch, new_tokens, hidden)`` float32.

        Raises `SessionError` when a hop failed and could not be replaced (or refused our
        input as malformed), `RoutingError` when no servers are left for a failed hop's layers.
        """
        if hidden.dim() != 3 or hidden.shape[0] != self.batch_size:
            raise SessionError(f"hidden states must be ({self.batch_size}, seq, hidden)")
        step = self.step_count
        x = hidden.to(self.config.torch_wire_dtype)  # (batch, seq, hidden)
        k, explicit = 0, True
        while k < len(self._hops):
            send_now = explicit or not self.config.use_push
            state = self._hops[k]
            try:
                n = await step_hop(
                    self.opener,
                    self._hops,
                    k,
                    step,
                    x,
                    positions,
                    send_now=send_now,
                    hedges=self.hedges,
                )
            except HopFailure as failure:
                await self._recover(k, step, failure)
                explicit = True
                continue
            replaced = self._hops[k] is not state  # a hedge's replacement took hop k's place
            if replaced:
                self.routes.append(self.route)
            x = self._hops[k + n - 1].outputs[-1].to(self.config.torch_wire_dtype)
            # the hop after a replacement takes its pushes from the next step on: send now
            k, explicit = k + n, replaced
        self.step_count += 1
        return x.float()

    # ---- recovery ----

    async def _recover(self, k: int, step: int, failure: HopFailure) -> None:
        """Replace hop ``k`` (failed at ``step``) by new hops that hold the same cache.

        Raises `SessionError` past ``max_recoveries``, `RoutingError` with no servers left.
        """
        avoid: set[PeerId] = set()
        while True:
            if not self.opener.ban(failure):  # draining, full, or our session expired
                avoid.add(failure.hop.server.peer_id)
            self.recoveries += 1
            if self.recoveries > self.config.max_recoveries:
                raise SessionError(
                    f"gave up after {self.recoveries - 1} recoveries; last failure: {failure}"
                ) from failure.cause
            try:
                new = await open_replacement(self.opener, self._hops, k, step, avoid)
                await splice(self.opener, self._hops, k, new, step)
                self.routes.append(self.route)
                return
            except HopFailure as again:
                failure = again
