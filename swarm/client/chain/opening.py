"""`HopOpener`: plan routes over a layer range and open one sub-session per hop, for one
`Chain` (its route at the start, and every replacement later)."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from collections.abc import Collection
from contextlib import AsyncExitStack

import trio

from swarm.client.chain.failures import FailurePolicy
from swarm.client.chain.hop import HopFailure, HopState, close_hop, push_target, rewire
from swarm.client.config import ClientConfig
from swarm.client.discovery import ServerDirectory
from swarm.client.routing import Hop, plan_route
from swarm.errors import (
    DeadlineExceeded,
    ProtocolError,
    RemoteError,
    RoutingError,
    SessionError,
    TransportError,
)
from swarm.net.messages import InferenceOpen, InferenceReady, PushTarget
from swarm.net.pool import ConnectionPool
from swarm.net.surface import open_inference
from swarm.types import LayerRange, PeerId, parse_address

__all__ = ["HopOpener"]

log = logging.getLogger(__name__)


class HopOpener:
    """Opens sub-sessions of one chain's shape (``max_length``, ``batch_size``) on routes
    that avoid banned and ``excluded`` servers; servers that fail to open are handed to the
    chain's `FailurePolicy`."""

    def __init__(
        self,
        pool: ConnectionPool,
        directory: ServerDirectory,
        config: ClientConfig,
        *,
        max_length: int,
        batch_size: int,
        failures: FailurePolicy,
        rng: random.Random,
        excluded: Collection[PeerId] = (),
    ) -> None:
        self.pool = pool
        self.directory = directory
        self.config = config
        self.max_length = max_length
        self.batch_size = batch_size
        self.failures = failures
        self.bans = failures.bans
        self.rng = rng
        self.excluded = set(excluded)  # never routed to (verification bans)

    async def plan(
        self, layers: LayerRange, avoid: Collection[PeerId] = (), *, route_wait: float = 0.0
    ) -> list[Hop]:
        """A route for ``layers`` without banned, excluded or ``avoid`` servers, penalised
        ones and those whose records the directory has not proven (`ServerDirectory.reached`)
        costing more, and those whose last ping failed (`ServerDirectory.unreachable`) much
        more (asks the directory again once; with ``route_wait`` > 0, on asking
        for that many seconds, after 1 s and then doubling up to 4 s between looks, while
        no route exists). Raises `RoutingError`."""
        deadline = trio.current_time() + route_wait
        looks = 0
        while True:
            looks += 1
            try:
                return await self._plan_once(layers, avoid)
            except RoutingError as exc:
                left = deadline - trio.current_time()
                if left <= 0:
                    raise
                log.info("%s; looking again for %.0f s more", exc, left)
            await trio.sleep(min(self.config.failures.route_look_s(looks), left))

    async def _plan_once(self, layers: LayerRange, avoid: Collection[PeerId]) -> list[Hop]:
        refreshes: tuple[bool, ...] = (False, True)
        wait = self.failures.take_refresh_wait()
        if wait > 0:  # a relayed path broke: give its server time to re-announce
            await trio.sleep(wait)
            refreshes = (True,)
        for refresh in refreshes:
            servers = await self.directory.servers(refresh=refresh)
            try:
                return plan_route(
                    servers,
                    layers,
                    client_pings=self.directory.pings,
                    cache_tokens_needed=self.max_length * self.batch_size,
                    banned=self.bans.banned() | self.excluded | set(avoid),
                    penalties=self.bans.penalties.current(),
                    unproven={s.peer_id for s in servers if not self.directory.reached(s)},
                    unreachable={s.peer_id for s in servers if self.directory.unreachable(s)},
                    rng=self.rng,
                )
            except RoutingError as exc:
                error = exc
        banned = len(self.bans.banned())
        hint = self.directory.absence_hint()
        why = f"; {hint}" if hint else ""
        raise RoutingError(f"{error} ({banned} servers banned after failures){why}") from error

    async def open_range(
        self,
        layers: LayerRange,
        first_step: int,
        next_target: PushTarget | None,
        push_from: PeerId | None,
        avoid: Collection[PeerId] = (),
        *,
        route_wait: float = 0.0,
    ) -> list[HopState]:
        """Open sub-sessions covering ``layers``, pushing on to ``next_target``; the first
        takes pushes from ``push_from`` only (the server before ``layers``; None: none).
        While no route exists, look again for up to ``route_wait`` seconds (`plan`).

        Every server that fails to open is banned (one that is only full or draining is
        avoided instead, see `blameless`) and the rest of the range re-planned, up to
        ``max_open_retries`` times: the servers of a route fail together (a third of a
        swarm leaving at once leaves that share of stale records in every route), so all
        of one attempt's failures are banned at once and count as one retry, instead of
        finding them one re-plan at a time. Raises `RoutingError` or `SessionError`.
        """
        opened: list[HopState] = []
        start, failures = layers.start, 0
        avoid = set(avoid)
        try:
            while start < layers.stop:
                plan = await self.plan(LayerRange(start, layers.stop), avoid, route_wait=route_wait)
                before = opened[-1].hop.server.peer_id if opened else push_from
                states, failed = await self._open_plan(plan, first_step, next_target, before)
                opened += states
                start = states[-1].hop.layers.stop if states else start
                if failed:
                    failures += 1
                    for failure in failed:
                        if not self.failures.ban(failure):
                            avoid.add(failure.hop.server.peer_id)
                    if failures > self.config.failures.max_open_retries:
                        raise SessionError(
                            f"opening layers {layers} failed {failures} times; "
                            f"last: {', '.join(map(str, failed))}"
                        ) from failed[0].cause
            if self.config.pipeline.use_push:
                await rewire(opened, next_target)
        except BaseException:
            with trio.CancelScope(shield=True):
                for state in opened:
                    await close_hop(state)
            raise
        return opened

    async def _open_plan(
        self,
        plan: list[Hop],
        first_step: int,
        next_target: PushTarget | None,
        push_from: PeerId | None,
    ) -> tuple[list[HopState], list[HopFailure]]:
        """Open every hop of ``plan`` at once (one round trip, not one per hop).

        Returns the opened prefix of the plan and every hop's failure, in the plan's order;
        hops opened after a failed one are closed again (the rest of the range is planned
        anew).
        """
        ids = [os.urandom(16) for _ in plan]
        results: list[HopState | HopFailure | None] = [None] * len(plan)

        async def one(i: int) -> None:
            push_to = push_target(plan[i + 1], ids[i + 1]) if i + 1 < len(plan) else next_target
            pusher = plan[i - 1].server.peer_id if i > 0 else push_from
            try:
                results[i] = await self._open_hop(plan[i], ids[i], push_to, pusher, first_step)
            except HopFailure as failure:
                results[i] = failure

        try:
            async with trio.open_nursery() as nursery:
                for i in range(len(plan)):
                    nursery.start_soon(one, i)
        except BaseException:
            with trio.CancelScope(shield=True):
                for result in results:
                    if isinstance(result, HopState):
                        await close_hop(result)
            raise
        opened: list[HopState] = []
        failed = [result for result in results if isinstance(result, HopFailure)]
        for result in results:
            if isinstance(result, HopFailure):
                break
            if isinstance(result, HopState):
                opened.append(result)
        for result in results[len(opened) :]:
            if isinstance(result, HopState):
                with trio.CancelScope(shield=True):
                    await close_hop(result)
        return opened, failed

    async def _open_hop(
        self,
        hop: Hop,
        session_id: bytes,
        push_to: PushTarget | None,
        push_from: PeerId | None,
        first_step: int,
    ) -> HopState:
        """Dial, open the stream, wait for `InferenceReady`. Raises `HopFailure`."""
        cfg = self.config
        host, port = parse_address(hop.server.address)
        stack = AsyncExitStack()
        try:
            with trio.move_on_after(cfg.connect_timeout) as scope:
                conn = await self.pool.get(host, port, hop.server.peer_id)
            if scope.cancelled_caught:
                raise DeadlineExceeded(f"connecting took over {cfg.connect_timeout} s")
            stream = await stack.enter_async_context(open_inference(conn, timeout=cfg.step_timeout))
            await stream.send(
                InferenceOpen(
                    session_id=session_id,
                    max_length=self.max_length,
                    batch_size=self.batch_size,
                    dtype=cfg.pipeline.wire_dtype,
                    layer_range=hop.layers,
                    push_to=push_to if cfg.pipeline.use_push else None,
                    first_step=first_step,
                    push_from=push_from if cfg.pipeline.use_push else None,
                )
            )
            ready = await stream.receive(InferenceReady, timeout=cfg.request_timeout)
            if ready.session_id != session_id:
                raise ProtocolError("InferenceReady names another session")
        except trio.EndOfChannel as exc:
            await stack.aclose()
            raise HopFailure(hop, ProtocolError("the server ended the stream")) from exc
        except (TransportError, ProtocolError, RemoteError) as exc:
            await stack.aclose()
            raise HopFailure(hop, exc) from exc
        except BaseException:
            await stack.aclose()
            raise
        if hop.server.relays:  # the path this stream takes, whatever the plan assumed
            used = self.pool.is_direct(hop.server.peer_id, conn)
            if used != hop.server.upgraded:
                hop = Hop(dataclasses.replace(hop.server, upgraded=used), hop.layers)
        state = HopState(hop, session_id, stream, stack, first_step)
        state.push_to = push_to if cfg.pipeline.use_push else None
        return state
