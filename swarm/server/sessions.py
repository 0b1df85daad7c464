"""The server's session table: who holds which KV cache, and the limits on them.

A session is opened by a client's ``inference`` stream and owns one `KVCache` for its
layer sub-range, allocated for ``max_length × batch_size`` tokens. The table enforces the
server's limits when a session opens: sessions and cache tokens in all, tokens per session,
batch, and fair shares per peer and per address (`swarm.server.quotas`: soft, borrowed room
is reclaimed when someone within its share needs it, so neither one client nor a factory
of identities behind one address can keep others out). `run_reaper` closes sessions idle past the
timeout on a timer, whatever their owners do. Inputs for a step can arrive from the client or
be pushed by the previous server; whichever arrives first is used; a step number that is
neither the next one nor a late duplicate of the last is an error at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import trio

from swarm.errors import ConfigError, ErrorCode, LimitExceeded, RemoteError, SessionError
from swarm.net.messages import PushTarget
from swarm.server.quotas import SessionQuotas, newcomer_room, plan_admission
from swarm.shards.cache import KVCache
from swarm.shards.span import Span
from swarm.types import LayerRange, PeerId

__all__ = ["Session", "SessionLimits", "SessionTable", "StepInput"]


@dataclass(frozen=True)
class SessionLimits:
    """Limits on sessions.

    - ``max_sessions`` (64), ``cache_tokens`` (65,536 token slots, ``max_length × batch``
      over all sessions): the server's totals.
    - ``max_sessions_per_peer`` (16) and ``peer_cache_share`` (0.25 of ``cache_tokens``):
      one authenticated peer's share; ``max_sessions_per_host`` (32) and
      ``host_cache_share`` (0.5): the share of all peers at one IP address together. Shares
      are soft: beyond them a peer borrows room that is reclaimed when others need it; one
      session bigger than a peer's cache share is refused.
    - ``max_length`` (8192 tokens per session), ``max_batch`` (8).
    - ``idle_timeout`` (120 s): a session without a step for this long is closed by the
      reaper, which looks every ``idle_timeout / 4`` s (at most every 10 s).
    - ``max_pending_steps`` (4): pushed inputs held ahead of the step being computed.
    """

    max_sessions: int = 64
    max_length: int = 8192
    cache_tokens: int = 65536
    max_batch: int = 8
    idle_timeout: float = 120.0
    max_pending_steps: int = 4
    max_sessions_per_peer: int = 16
    max_sessions_per_host: int = 32
    peer_cache_share: float = 0.25
    host_cache_share: float = 0.5

    def __post_init__(self) -> None:
        for name in ("peer_cache_share", "host_cache_share"):
            share = getattr(self, name)
            if not 0.0 < share <= 1.0:
                raise ConfigError(f"SessionLimits.{name} must be in (0, 1], got {share}")
        if self.idle_timeout < 0:
            raise ConfigError("SessionLimits.idle_timeout must not be negative")

    @property
    def peer_cache_tokens(self) -> int:
        return int(self.cache_tokens * self.peer_cache_share)

    @property
    def host_cache_tokens(self) -> int:
        return int(self.cache_tokens * self.host_cache_share)


@dataclass
class StepInput:
    """Hidden states (batch, seq, hidden) and positions (batch, seq) for one step."""

    hidden: torch.Tensor
    positions: torch.Tensor
    keep: int | None = None  # cache tokens to keep before this step (None: all)


@dataclass
class Session:
    session_id: bytes
    client: PeerId | None
    host: str | None  # the client's IP address (None: not over a socket)
    layers: LayerRange
    cache: KVCache
    max_length: int
    batch_size: int
    span: Span
    push_to: PushTarget | None = None
    push_from: PeerId | None = None  # the one peer whose pushes this session takes
    next_step: int = 0
    scope: trio.CancelScope | None = None  # the handler serving it; cancelled on close
    close_reason: RemoteError | None = None  # what its client is told when the table closes it
    last_step: int = -1
    committed: int = 0  # cache tokens before the last step: a rollback never goes below
    last_active: float = field(default_factory=trio.current_time)  # trio's clock: tests mock it
    _inputs: dict[int, StepInput] = field(default_factory=dict)
    _arrival: trio.Event = field(default_factory=trio.Event)  # set by each arrival (`wake`)

    @property
    def tokens(self) -> int:
        """Cache token slots this session holds."""
        return self.max_length * self.batch_size

    def check_step_number(self, step: int, *, limit: int) -> bool:
        """Whether an input for ``step`` is worth keeping: True for the next steps (up to
        ``limit`` ahead), False for a late duplicate of the step just begun when a push may have
        delivered it first. Raises `SessionError` for a step long past or too far ahead, or
        a replay of the last step where no push could have come first: no client sends
        those, and the sender gets an error answer rather than silence."""
        if self.next_step <= step < self.next_step + limit:
            return True
        if step == self.last_step and self.push_from is not None:
            return False  # the client's copy of an input a push delivered first
        raise SessionError(
            f"step {step} is out of order: this session expects step {self.next_step}"
        )

    def deliver(self, step: int, item: StepInput, *, limit: int) -> bool:
        """Offer the input of `step`; False if it came too late or is a duplicate."""
        if step < self.next_step or step in self._inputs:
            return False
        if len(self._inputs) >= limit:
            raise LimitExceeded(f"session holds {limit} pending inputs already")
        self._inputs[step] = item
        self._arrival.set()
        return True

    def take_input(self, step: int) -> StepInput | None:
        """The input of ``step`` if it arrived (from the client or a push), else None."""
        return self._inputs.pop(step, None)

    def wake(self) -> None:
        """Something the session's processor waits for arrived (an input is `deliver`ed; a
        message on its stream calls this): end its `wait_arrival`."""
        self._arrival.set()

    async def wait_arrival(self, deadline: float) -> bool:
        """Wait for the next arrival (`wake`) until ``deadline`` (trio's clock); False if
        none came by then. What arrived before the call does not count: the caller took
        it, without waiting since."""
        if self._arrival.is_set():
            self._arrival = trio.Event()
        with trio.move_on_at(deadline):
            await self._arrival.wait()
            return True
        return False

    def roll_back(self, keep: int) -> None:
        """Keep only the cache's first ``keep`` tokens: drafted tokens of the last step that
        the client rejected (speculative decoding). Only the last step's tokens can go; what
        came before it the client already built on.

        Raises:
            SessionError: ``keep`` is below what the steps before the last one left, or
                above what the cache holds.
        """
        if not self.committed <= keep <= self.cache.length:
            raise SessionError(
                f"cannot roll back to {keep} tokens: this session holds {self.cache.length} "
                f"and its last step began at {self.committed}"
            )
        self.cache.truncate(keep)

    def begin_step(self, step: int) -> None:
        if step <= self.last_step:
            raise SessionError(f"step {step} is not after the last step {self.last_step}")
        self.committed = self.cache.length
        self.last_step = step
        self.next_step = step + 1
        self.last_active = trio.current_time()


class SessionTable:
    """Open sessions by id, within the server's limits."""

    def __init__(
        self,
        limits: SessionLimits,
        allocate: Callable[[LayerRange, int, int], KVCache],
        narrow: Callable[[LayerRange], Span],
    ) -> None:
        self.limits = limits
        self._allocate = allocate
        self._narrow = narrow
        self._sessions: dict[bytes, Session] = {}
        self.reclaimed = 0  # sessions closed to give others their share
        self._reserved = 0  # tokens held by temporary caches (`reserve`)

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def tokens_used(self) -> int:
        return sum(s.tokens for s in self._sessions.values()) + self._reserved

    @contextlib.contextmanager
    def reserve(self, tokens: int) -> Iterator[None]:
        """Hold ``tokens`` of the cache budget for a temporary cache (a chunked stateless
        forward) while the block runs. Raises `LimitExceeded` when they are not free."""
        if tokens > self.free_tokens:
            raise LimitExceeded(
                f"not enough cache for this forward: it needs {tokens} tokens, "
                f"{self.free_tokens} free of {self.limits.cache_tokens}"
            )
        self._reserved += tokens
        try:
            yield
        finally:
            self._reserved -= tokens

    @property
    def free_tokens(self) -> int:
        return max(self.limits.cache_tokens - self.tokens_used, 0)

    def open(
        self,
        session_id: bytes,
        client: PeerId | None,
        layers: LayerRange,
        max_length: int,
        batch_size: int,
        host: str | None = None,
    ) -> Session:
        """Allocate a session's cache, or raise `LimitExceeded` saying which limit."""
        lim = self.limits
        self.close_idle()
        if session_id in self._sessions:
            raise SessionError(f"session {session_id.hex()} is already open")
        if not 0 < max_length <= lim.max_length:
            raise LimitExceeded(f"max_length {max_length} is outside 1..{lim.max_length}")
        if not 0 < batch_size <= lim.max_batch:
            raise LimitExceeded(f"batch size {batch_size} is outside 1..{lim.max_batch}")
        need = max_length * batch_size
        self._admit(client, host, need)
        cache = self._allocate(layers, batch_size, max_length)
        session = Session(
            session_id, client, host, layers, cache, max_length, batch_size, self._narrow(layers)
        )
        self._sessions[session_id] = session
        return session

    @property
    def room_tokens(self) -> int:
        """Cache tokens a newcomer within its share could get now: free plus what reclaiming
        borrowed room frees, at most one peer's share (`swarm.server.quotas.newcomer_room`)."""
        return newcomer_room(self._quotas(), list(self._sessions.values()))

    def _quotas(self) -> SessionQuotas:
        lim = self.limits
        return SessionQuotas(
            max_sessions=lim.max_sessions,
            cache_tokens=lim.cache_tokens - self._reserved,  # temporary caches are not reclaimed
            per_peer_sessions=lim.max_sessions_per_peer,
            per_host_sessions=lim.max_sessions_per_host,
            per_peer_tokens=lim.peer_cache_tokens,
            per_host_tokens=lim.host_cache_tokens,
        )

    def _admit(self, client: PeerId | None, host: str | None, need: int) -> None:
        """Make room for a session of ``need`` tokens (reclaiming what others borrowed beyond
        their shares, see `swarm.server.quotas`), or raise `LimitExceeded`."""
        quotas = self._quotas()
        victims = plan_admission(quotas, list(self._sessions.values()), client, host, need)
        reason = RemoteError(
            ErrorCode.SESSION,
            "session reclaimed: the server is full and your peer or address held more than "
            "its share",
        )
        for victim in victims:
            self.close(victim.session_id, reason)
        self.reclaimed += len(victims)

    async def run_reaper(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Close idle sessions on a timer until cancelled (whatever their owners do)."""
        period = min(max(self.limits.idle_timeout / 4, 0.05), 10.0)
        task_status.started()
        while True:
            await trio.sleep(period)
            self.close_idle()

    def get(self, session_id: bytes) -> Session:
        """The open session, or `SessionError` if it is unknown, closed or expired."""
        session = self._sessions.get(session_id)
        if session is None:
            raise SessionError(f"unknown or expired session {session_id.hex()}")
        return session

    def close(self, session_id: bytes, reason: RemoteError | None = None) -> None:
        """Forget the session and stop the handler serving it (its cache is freed); the
        handler answers its client with ``reason`` (None: the session simply ended)."""
        session = self._sessions.pop(session_id, None)
        if session is None:
            return
        if session.close_reason is None:
            session.close_reason = reason
        if session.scope is not None:
            session.scope.cancel()

    def close_all(self, reason: RemoteError) -> int:
        """Close every session, telling each client ``reason``; returns how many."""
        ids = list(self._sessions)
        for sid in ids:
            self.close(sid, reason)
        return len(ids)

    def close_idle(self, now: float | None = None) -> int:
        """Close sessions idle past the timeout (``now`` on trio's clock, default the current
        time); returns how many were closed."""
        now = trio.current_time() if now is None else now
        idle = [
            sid
            for sid, s in self._sessions.items()
            if now - s.last_active > self.limits.idle_timeout
        ]
        reason = RemoteError(
            ErrorCode.SESSION, f"session closed after {self.limits.idle_timeout:g} s without a step"
        )
        for sid in idle:
            self.close(sid, reason)
        return len(idle)
