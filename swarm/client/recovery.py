"""Replacing a hop: sub-sessions on other servers that hold the same cache as the hop they
replace (its history replayed), spliced into the chain in its place.

Used both when a hop failed (`InferenceSession` bans it and replaces it) and when it is
only late (`swarm.client.hedging` races a replacement against it).
"""

from __future__ import annotations

import logging
from collections.abc import Collection

import torch
import trio

from swarm.client.hops import HopState, close_hop, run_step, set_push, set_pusher
from swarm.client.opening import HopOpener
from swarm.types import PeerId

__all__ = ["open_replacement", "splice"]

log = logging.getLogger(__name__)


async def open_replacement(
    opener: HopOpener, hops: list[HopState], k: int, step: int, avoid: Collection[PeerId] = ()
) -> list[HopState]:
    """Open sub-sessions for hop ``k``'s layers (to redo ``step`` there) holding its cache.

    They start at the last finished step, ``step - 1``, where hop ``k``'s whole history is
    replayed as one multi-token step (recorded as one entry); they push on to hop ``k+1``
    and take pushes from hop ``k-1`` (once `splice` told those). ``hops`` is not changed.
    Raises `RoutingError` / `SessionError` when no replacement opens, `HopFailure` when one
    fails the replay (it is not banned here).
    """
    failed = hops[k]
    next_target = hops[k + 1].target if k + 1 < len(hops) else None
    before = hops[k - 1].hop.server.peer_id if k > 0 else None
    replay_step = step - 1 if failed.inputs else step
    new = await opener.open_range(failed.hop.layers, replay_step, next_target, before, avoid)
    try:
        if failed.inputs:
            config = opener.config
            x = torch.cat([h for h, _ in failed.inputs], dim=1)  # (batch, history, hidden)
            pos = torch.cat([p for _, p in failed.inputs], dim=1)  # (batch, history)
            for state in new:
                answer = await run_step(
                    state, config, replay_step, x, pos, send_now=True, grace=config.push_grace
                )
                state.record(x, pos, answer)
                x = answer.out.to(config.torch_wire_dtype)
    except BaseException:
        with trio.CancelScope(shield=True):
            for state in new:
                await close_hop(state)
        raise
    return new


async def splice(
    opener: HopOpener, hops: list[HopState], k: int, new: list[HopState], step: int
) -> None:
    """Put ``new`` (from `open_replacement`) in hop ``k``'s place in ``hops``, close the old
    hop, point hop ``k-1``'s pushes at ``new`` and tell hop ``k+1`` to take its pushes."""
    old = hops[k]
    hops[k : k + 1] = new
    await close_hop(old)
    if opener.config.use_push:
        if k > 0:
            await set_push(hops[k - 1], new[0].target, step)
        after = k + len(new)
        if after < len(hops):
            await set_pusher(hops[after], new[-1].hop.server.peer_id, step)
    log.info("replaced %s with %d hop(s) at step %d", old.hop.server.peer_id, len(new), step)
