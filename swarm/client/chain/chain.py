"""`Chain`: one generation's pipeline through servers, the one owner of its hops.

The chain plans a route, opens one ``inference`` stream per hop and wires each hop's push
target to the next hop (`HopOpener`). A step sends its input to the first hop; with push on,
the servers pass the hidden states along themselves and the client only collects every hop's
output (sending hop k+1's input itself when its result is ``push_grace`` late); with push
off, the client relays every hop's input. Each hop keeps its history (`HopHistory`).

Everything that changes the list of hops is a method here: `open`, `step`, `replace` (open
sub-sessions for a hop's layers elsewhere and replay its history there), `splice` (put them
in its place and rewire the pushes around them) and `recover`. Strategies ask the chain:
hedging (`swarm.client.chain.hedging`) races a late hop against a `replace`-ment and splices
the winner in; the failure policy (ban, penalise, blameless answers) is the chain's
`FailurePolicy`, shared bans and all.

A step returns a `StepResult`: the last hop's per-position output and, per hop, its input,
output, receipt and time, with a view of its history that verification concatenates only
when it checks. Nothing of a step is left for a caller to pull out of the chain afterwards.

Steps and speculation: `step` takes ``(batch, n, hidden)`` states of any number ``n`` of new
positions and returns ``(batch, n, hidden)`` outputs, one per position; a prefill, a chat
turn and a replay are such steps, and so would a speculative step carrying ``k`` drafted
tokens be. Accepting only a prefix of those positions (servers cutting their caches back,
`HopHistory` cut to the accepted length) is not built yet; it belongs next to `step`.
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
from swarm.client.chain.failures import FailurePolicy
from swarm.client.chain.hedging import HedgeRecord, alternative_seconds, step_hop
from swarm.client.chain.hop import HopFailure, HopState, close_hop, rewire, run_step
from swarm.client.chain.opening import HopOpener
from swarm.client.chain.results import HopStep, StepResult
from swarm.client.config import ClientConfig
from swarm.client.discovery import ServerDirectory
from swarm.client.routing import Hop
from swarm.errors import SessionError
from swarm.net.pool import ConnectionPool
from swarm.types import LayerRange, PeerId

__all__ = ["Chain", "ChainStatistics"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChainStatistics:
    steps: int
    recoveries: int
    failures: tuple[str, ...]
    hop_seconds: tuple[tuple[float, ...], ...]  # per hop of the current route, per entry
    hedges: tuple[HedgeRecord, ...] = ()  # every hedged hop step, in order


class Chain:
    """A pipeline through servers covering ``layers``; make one with `Chain.open`.

    Not safe for concurrent `step` calls (steps are ordered by nature); one chain belongs to
    one generation.
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
        self.policy = FailurePolicy(config, bans)
        self.opener = HopOpener(
            pool,
            directory,
            config,
            max_length=max_length,
            batch_size=batch_size,
            failures=self.policy,
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
    ) -> AsyncIterator[Chain]:
        """Plan a route and open every hop; end every hop's stream on exit.

        ``excluded`` peers are never routed to (peers banned by verification).
        Raises `RoutingError` if no route covers ``layers``, `SessionError` if more than
        ``config.failures.max_open_retries`` servers failed while opening.
        """
        bans = bans or BanList(
            config.failures.ban_base_s, config.failures.ban_backoff, config.failures.ban_max_s
        )
        chain = cls(
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
            chain._hops = await chain.opener.open_range(layers, 0, None, None)
            chain.routes.append(chain.route)
            yield chain
        finally:
            with trio.CancelScope(shield=True):
                await chain.aclose()

    @property
    def route(self) -> list[Hop]:
        """The hops in use now."""
        return [state.hop for state in self._hops]

    async def alternative(self, k: int, tokens: int) -> float | None:
        """What the best other server for hop ``k``'s layers should take for a step of
        ``tokens`` tokens, from the records the directory has proven (`alternative_seconds`);
        the hedge deadline's yardstick beside the hop's own history. An unproven record may
        claim any throughput, so it sets no deadline (it may still serve a replacement)."""
        directory = self.opener.directory
        servers = [s for s in await directory.servers() if directory.reached(s)]
        return alternative_seconds(self._hops[k], servers, tokens, directory.pings)

    @property
    def tokens(self) -> int:
        """Positions every hop's cache holds (drafts of the last step included until the next
        step's ``keep`` drops the rejected ones)."""
        return self._hops[0].history.tokens if self._hops else 0

    @property
    def bans(self) -> BanList:
        return self.policy.bans

    @property
    def failures(self) -> list[str]:
        """Every hop failure this chain banned a server for, oldest first."""
        return self.policy.failures

    def hop(self, k: int) -> HopState:
        """Hop ``k`` as it stands now (read only: change hops through the chain's methods)."""
        return self._hops[k]

    def statistics(self) -> ChainStatistics:
        return ChainStatistics(
            steps=self.step_count,
            recoveries=self.recoveries,
            failures=tuple(self.failures),
            hop_seconds=tuple(tuple(state.history.seconds) for state in self._hops),
            hedges=tuple(self.hedges),
        )

    async def aclose(self) -> None:
        """End every hop's stream (quietly: a dead hop has nothing left to close)."""
        hops, self._hops = self._hops, []
        for state in hops:
            await close_hop(state)

    # ---- steps ----

    async def step(
        self, hidden: torch.Tensor, positions: torch.Tensor, *, keep: int | None = None
    ) -> StepResult:
        """Run one step of ``n`` new positions through every hop: ``hidden`` ``(batch, n,
        hidden)``, ``positions`` ``(batch, n)``; returns its `StepResult` (``output``:
        ``(batch, n, hidden)`` float32, one row per position).

        ``keep`` (speculative decoding): before this step every hop keeps only the first
        ``keep`` tokens it holds, dropping the drafted tokens of the last step that were not
        accepted (the histories now, the servers' caches with this step's input). It must lie
        within the last step's tokens.

        Raises `SessionError` when a hop failed and could not be replaced (or refused our
        input as malformed), `RoutingError` when no servers are left for a failed hop's layers.
        """
        if hidden.dim() != 3 or hidden.shape[0] != self.batch_size:
            raise SessionError(f"hidden states must be ({self.batch_size}, seq, hidden)")
        step = self.step_count
        if keep is not None:
            for state in self._hops:
                state.history.truncate(keep)
        x = hidden.to(self.config.torch_wire_dtype)  # (batch, n, hidden)
        k, explicit = 0, True
        while k < len(self._hops):
            send_now = explicit or not self.config.pipeline.use_push
            state = self._hops[k]
            try:
                n = await step_hop(self, k, step, x, positions, send_now=send_now, keep=keep)
            except HopFailure as failure:
                await self.recover(k, step, failure)
                explicit = True
                continue
            replaced = self._hops[k] is not state  # a hedge's replacement took hop k's place
            if replaced:
                self.routes.append(self.route)
            x = self._hops[k + n - 1].history.outputs[-1].to(self.config.torch_wire_dtype)
            # the hop after a replacement takes its pushes from the next step on: send now
            k, explicit = k + n, replaced
        self.step_count += 1
        return self._result(step, x.float(), positions, keep)

    def _result(
        self, step: int, output: torch.Tensor, positions: torch.Tensor, keep: int | None
    ) -> StepResult:
        hops = []
        for state in self._hops:
            h = state.history
            x, pos = h.inputs[-1]
            out, receipt, seconds = h.outputs[-1], h.receipts[-1], h.seconds[-1]
            hops.append(HopStep(state.hop, x, pos, out, receipt, seconds, h.view()))
        return StepResult(step, output, positions, tuple(hops), self.recoveries, keep)

    # ---- replacing hops ----

    async def replace(
        self, k: int, step: int, avoid: Collection[PeerId] = (), *, route_wait: float = 0.0
    ) -> list[HopState]:
        """Open sub-sessions for hop ``k``'s layers (to redo ``step`` there) holding its cache.
        While no server can take them, look again for up to ``route_wait`` seconds.

        They start at the last finished step, ``step - 1``, where hop ``k``'s whole history is
        replayed as one multi-token entry; they push on to hop ``k+1`` and take pushes from
        hop ``k-1`` once `splice` told those. The chain is not changed until `splice`.
        Raises `RoutingError` / `SessionError` when no replacement opens, `HopFailure` when
        one fails the replay (it is not banned here: the caller decides).
        """
        failed, hops = self._hops[k], self._hops
        next_target = hops[k + 1].target if k + 1 < len(hops) else None
        before = hops[k - 1].hop.server.peer_id if k > 0 else None
        history = failed.history
        replay_step = step - 1 if len(history) else step
        new = await self.opener.open_range(
            failed.hop.layers, replay_step, next_target, before, avoid, route_wait=route_wait
        )
        try:
            if len(history):
                x, pos, _ = history.tensors(len(history))  # (batch, T, hidden), (batch, T)
                await self.run_through(new, replay_step, x.to(self.config.torch_wire_dtype), pos)
        except BaseException:
            with trio.CancelScope(shield=True):
                for state in new:
                    await close_hop(state)
            raise
        return new

    async def run_through(
        self, states: list[HopState], step: int, x: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """Send ``step`` through ``states`` one after the other (the client relays), recording
        it in their histories; returns the last one's output. Raises `HopFailure`."""
        config = self.config
        for state in states:
            answer = await run_step(
                state, config, step, x, positions, send_now=True, grace=config.pipeline.push_grace
            )
            state.history.record(x, positions, answer)
            x = answer.out.to(config.torch_wire_dtype)
        return x

    async def splice(self, k: int, new: list[HopState], step: int) -> None:
        """Put ``new`` (from `replace`) in hop ``k``'s place, close the old hop, point hop
        ``k-1``'s pushes at ``new`` and tell hop ``k+1`` to take its pushes."""
        old = self._hops[k]
        self._hops[k : k + 1] = new
        await close_hop(old)
        if self.config.pipeline.use_push:
            after = k + len(new)
            before = self._hops[k - 1 : k] if k > 0 else []
            nxt = self._hops[after] if after < len(self._hops) else None
            target = nxt.target if nxt is not None else None
            await rewire([*before, *new], target, pusher_of=nxt)
        log.info("replaced %s with %d hop(s) at step %d", old.hop.server.peer_id, len(new), step)

    async def recover(self, k: int, step: int, failure: HopFailure) -> None:
        """Replace hop ``k`` (failed at ``step``) by new hops that hold the same cache.

        Where no other server covers its layers, look again for up to
        ``failures.route_wait_s`` (a block whose last server left is covered again by the
        swarm's rebalancing). Raises `SessionError` past ``max_recoveries``, `RoutingError`
        when no servers are left for the hop's layers after that wait.
        """
        avoid: set[PeerId] = set()
        while True:
            if not self.policy.ban(failure):  # draining, full, or our session expired
                avoid.add(failure.hop.server.peer_id)
            self.recoveries += 1
            if self.recoveries > self.config.failures.max_recoveries:
                raise SessionError(
                    f"gave up after {self.recoveries - 1} recoveries; last failure: {failure}"
                ) from failure.cause
            try:
                new = await self.replace(
                    k, step, avoid, route_wait=self.config.failures.route_wait_s
                )
                await self.splice(k, new, step)
                self.routes.append(self.route)
                return
            except HopFailure as again:
                failure = again
