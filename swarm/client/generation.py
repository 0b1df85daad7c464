"""The token loop: the one implementation behind `AsyncRemoteModel.stream`, ``generate`` and
`Chat.send`, and the events it yields.

A generation is a sequence of *attempts*: each gets a verified chain (`CheckedChain`) from its
`Attempts` (a fresh one for `stream`; the conversation's open one for a chat turn), feeds it
the ids it has not seen, then steps one token at a time: embed, `Chain.step`, check the
`StepResult` under the policy, sample, decode. A proven lie ends the attempt; the loop drops
every token computed from it, yields `RolledBack`, and starts the next attempt from what stands.

Events are a closed vocabulary (`Event`):

- `Token`: one new token, with the text it adds (text is held back while a stop string or a
  split character may still form);
- `RolledBack`: verification proved a lie; the answer now ends after ``position`` tokens and
  its text is ``text``: everything shown after it is void (tokens that follow replace it);
- `Done`: the last event, with its `StopReason`.

Per-generation state (the verification of its chain, its receipts, timings and route) lives
in the `TokenLoop` and the `GenerationResult` it fills; only bans and reputation are shared.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import trio
from tokenizers import Tokenizer

from swarm.client.chain import StepResult
from swarm.client.routing import Hop
from swarm.client.sampling import Sampler
from swarm.client.text import StopText
from swarm.client.verifying import CheckedChain
from swarm.net.messages import Receipt
from swarm.shards import Head
from swarm.verify import VerifierStatistics

__all__ = [
    "AnswerText",
    "Attempt",
    "Attempts",
    "Done",
    "Event",
    "GenerationResult",
    "RolledBack",
    "StopReason",
    "Token",
    "TokenLoop",
    "route_dicts",
]


class StopReason(enum.StrEnum):
    """Why a generation ended."""

    LENGTH = "length"  # max_new_tokens reached
    EOS = "eos"  # an end-of-sequence (end-of-turn) id, included in the ids
    STOP = "stop"  # a stop string, left out of the text


@dataclass(frozen=True)
class Token:
    """One generated token: its id and the text it adds ("" when held back or no tokenizer)."""

    id: int
    text: str
    seconds: float  # since the step's input was ready (the first: since generation began)


@dataclass(frozen=True)
class RolledBack:
    """A proven lie: the answer now holds its first ``position`` tokens, spelling ``text``;
    what was yielded after that is void, and the tokens that follow replace it."""

    position: int
    text: str


@dataclass(frozen=True)
class Done:
    """The generation ended (always the last event)."""

    reason: StopReason


Event = Token | RolledBack | Done


class AnswerText:
    """The answer's text as a generation's events make it, and what of it to show.

    `push` returns ``(erase, piece)``: how many characters at the end of what was shown a
    `RolledBack` voided, and the text to show next. With ``hold`` (for a reader that cannot
    take text back: a pipe, a server-sent event stream) text is shown only at `Done`, so
    what was shown is always the final text; without it (a terminal, or a policy under which
    nothing rolls back) tokens show as they come and a rollback asks to erase. ``as_ids``
    spells each token as ``"<id> "`` instead of its text.
    """

    def __init__(self, *, hold: bool, as_ids: bool = False) -> None:
        self.hold = hold
        self.as_ids = as_ids
        self.text = ""  # the answer as it stands
        self.shown = ""  # what was shown of it

    def push(self, event: Event) -> tuple[int, str]:
        erase = 0
        if isinstance(event, Token):
            self.text += f"{event.id} " if self.as_ids else event.text
        elif isinstance(event, RolledBack):
            self.text = self._kept(event)
            common = _common_prefix(self.shown, self.text)
            erase, self.shown = len(self.shown) - common, self.shown[:common]
        if self.hold and not isinstance(event, Done):
            return erase, ""
        piece = self.text[len(self.shown) :]
        self.shown = self.text
        return erase, piece

    def _kept(self, event: RolledBack) -> str:
        if not self.as_ids:
            return event.text
        return "".join(f"{i} " for i in self.text.split()[: event.position])


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass
class GenerationResult:
    """Everything about one generation (what ``swarm generate --json`` prints)."""

    ids: list[int] = field(default_factory=list)
    text: str | None = None
    route: list[dict[str, Any]] = field(default_factory=list)
    timings: list[float] = field(default_factory=list)
    ttft: float = 0.0
    recoveries: int = 0
    stop_reason: StopReason = StopReason.LENGTH
    rollbacks: int = 0  # times verification proved a lie and generation went back
    verification: VerifierStatistics | None = None  # None under the policy ``none``


def route_dicts(hops: Sequence[Hop]) -> list[dict[str, Any]]:
    """``[{peer, host, port, start, stop}]`` of a route."""
    out = []
    for hop in hops:
        host, _, port = hop.server.address.rpartition(":")
        out.append(
            {
                "peer": str(hop.server.peer_id),
                "host": host.removeprefix("[").removesuffix("]"),
                "port": int(port),
                "start": hop.layers.start,
                "stop": hop.layers.stop,
            }
        )
    return out


@dataclass(frozen=True)
class Attempt:
    """A chain to run on: it holds ``position`` ids already; ``feed`` goes in next (ending
    with the ids of the answer so far, ``answer`` of them)."""

    checked: CheckedChain
    position: int
    feed: list[int]
    answer: int


class Attempts(Protocol):
    """Where a `TokenLoop` gets its chains: ``open(answer)`` yields an `Attempt` that will
    continue the answer ``answer`` (its ids so far); ``finished(attempt, answer)`` is told
    when an attempt ended without a proven lie."""

    def open(self, answer: list[int]) -> AbstractAsyncContextManager[Attempt]: ...

    def finished(self, attempt: Attempt, answer: list[int]) -> None: ...


class TokenLoop:
    """One generation's token loop (see the module docstring); `events` runs it once."""

    def __init__(
        self,
        head: Head,
        eos: Sequence[int],
        tokenizer: Tokenizer | None,
        sampler: Sampler,
        max_new_tokens: int,
        stop: Sequence[str] = (),
    ) -> None:
        self.head = head
        self.eos = set(eos)
        self.tokenizer = tokenizer
        self.sampler = sampler
        self.max_new_tokens = max_new_tokens
        self.stop = tuple(stop)
        self.result = GenerationResult(text="" if tokenizer is not None else None)
        self.receipts: list[Receipt] = []  # every hop of every step, redone ones included
        self.text = StopText(tokenizer, stop) if tokenizer is not None else None
        self._done = False
        self._last: StepResult | None = None

    async def events(self, attempts: Attempts) -> AsyncIterator[Event]:
        """Run to the end, yielding `Token`, `RolledBack` and finally `Done`."""
        started = trio.current_time()
        while True:
            async with attempts.open(list(self.result.ids)) as attempt:
                rollback = None
                async for token in self._steps(attempt, started):
                    if isinstance(token, int):
                        rollback = token
                        break
                    yield token
                if rollback is None:
                    assert self._last is not None  # an attempt steps at least once
                    rollback = await attempt.checked.challenge(self._last)
                if rollback is None:
                    attempts.finished(attempt, list(self.result.ids))
            if rollback is None:
                break
            start = attempt.position + len(attempt.feed) - attempt.answer  # the answer's first
            yield self._roll_back(max(0, rollback - start + 1))
        yield Done(self.result.stop_reason)

    async def _steps(self, attempt: Attempt, started: float) -> AsyncIterator[Token | int]:
        """Tokens until done; a proven lie ends it with the token position it began at."""
        result, head = self.result, self.head
        ids, position = attempt.feed, attempt.position
        while not self._done and len(result.ids) < self.max_new_tokens:
            t0 = trio.current_time() if result.ids else started
            n = len(ids)
            positions = torch.arange(position, position + n).unsqueeze(0)  # (1, n)
            stepped = await attempt.checked.chain.step(head.embed(torch.tensor([ids])), positions)
            self._last = stepped
            position += n
            self.receipts += stepped.receipts
            rollback = await attempt.checked.check_step(stepped)
            if rollback is not None:
                yield rollback
                return
            logits = head.logits(stepped.output[:, -1:])[:, -1]  # (1, vocab)
            token = int(self.sampler.sample(logits, len(result.ids))[0])  # by answer index
            yield self._accept(token, trio.current_time() - t0, stepped)
            ids = [token]

    def _accept(self, token: int, seconds: float, stepped: StepResult) -> Token:
        result, text = self.result, self.text
        result.ids.append(token)
        result.timings.append(seconds)
        if len(result.ids) == 1:
            result.ttft = seconds
        piece, stopped = text.push(token) if text is not None else ("", False)
        result.route = route_dicts(stepped.route)
        result.recoveries = max(result.recoveries, stepped.recoveries)
        if stopped:
            result.stop_reason, self._done = StopReason.STOP, True
        elif token in self.eos:
            result.stop_reason, self._done = StopReason.EOS, True
            piece += text.flush() if text is not None else ""
        elif len(result.ids) == self.max_new_tokens and text is not None:
            piece += text.flush()
        if text is not None:
            result.text = text.text
        return Token(token, piece, seconds)

    def _roll_back(self, keep: int) -> RolledBack:
        """Drop every token computed from the lie (answer tokens from ``keep`` on)."""
        result = self.result
        del result.ids[keep:]
        del result.timings[keep:]
        result.rollbacks += 1
        result.stop_reason, self._done = StopReason.LENGTH, False
        if self.tokenizer is not None:
            self.text = StopText(self.tokenizer, self.stop)
            for token in result.ids:
                self.text.push(token)
            result.text = self.text.text
        shown = self.text.text[: self.text.emitted] if self.text is not None else ""
        return RolledBack(len(result.ids), shown)
