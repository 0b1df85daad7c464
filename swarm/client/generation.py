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
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, aclosing
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import trio
from tokenizers import Tokenizer

from swarm.client.chain import StepResult
from swarm.client.heads import HeadBatcher
from swarm.client.routing import Hop
from swarm.client.sampling import Sampler
from swarm.client.speculation import PlannerStatistics, Speculator, accept
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
    # its share of its round's time, from when the round's input was ready (several tokens
    # come from one round when guesses are accepted); the answer's first: since it began
    seconds: float


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
    rounds: int = 0  # steps through the chain (round trips); fewer than tokens when guesses hit
    speculation: PlannerStatistics | None = None  # None when no tokens were guessed


def route_dicts(hops: Sequence[Hop]) -> list[dict[str, Any]]:
    """``[{peer, host, port, start, stop, path, upgraded}]`` of a route (``path``:
    ``direct``, or ``relayed`` when ``host:port`` is the relay the hop is dialed through;
    ``upgraded``: a relayed server reached by a direct connection made through its relay,
    whose ``path`` is then ``direct``)."""
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
                "path": hop.server.path,
                "upgraded": hop.server.upgraded,
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
        *,
        heads: HeadBatcher | None = None,
        speculator: Speculator | None = None,
    ) -> None:
        self.head = head
        self.heads = heads or HeadBatcher(head)
        self.speculator = speculator
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
        self._route: tuple[list[Hop], list[dict[str, Any]]] | None = None  # route_dicts'

    async def events(self, attempts: Attempts) -> AsyncIterator[Event]:
        """Run to the end, yielding `Token`, `RolledBack` and finally `Done`."""
        started = trio.current_time()
        with self.heads.user():
            async with aclosing(self._attempts(attempts, started)) as events:
                async for event in events:
                    yield event
        yield Done(self.result.stop_reason)

    async def _attempts(self, attempts: Attempts, started: float) -> AsyncGenerator[Event]:
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
            keep = max(0, rollback - start + 1)
            shown = len(self.result.ids)
            rolled = self._roll_back(keep)
            if keep < shown:  # a lie on a rejected guess, or before any token, voids none
                yield rolled

    async def _steps(self, attempt: Attempt, started: float) -> AsyncIterator[Token | int]:
        """Tokens until done; a proven lie ends it with the token position it began at.

        Each round feeds the ids the chain has not seen (the prompt, then the last token)
        followed by the speculator's guesses, and keeps the guesses the target agrees with
        (`accept`) plus one token of its own; the next round's ``keep`` drops the rest from
        every cache. Without guesses a round is a plain decoding step.
        """
        result, chain = self.result, attempt.checked.chain
        ids, position = attempt.feed, attempt.position
        context = list(attempt.feed)  # what the drafter reads: this attempt's ids and answer
        while not self._done and len(result.ids) < self.max_new_tokens:
            t0 = trio.current_time() if result.ids else started
            room = self.max_new_tokens - len(result.ids) - 1  # the target adds one of its own
            draft = await self._draft(context, room)
            feed = [*ids, *draft]
            positions = torch.arange(position, position + len(feed)).unsqueeze(0)  # (1, n)
            keep = position if position < chain.tokens else None  # drop rejected guesses
            sent = trio.current_time()
            hidden = self.head.embed(torch.tensor([feed]))  # (1, n, hidden)
            stepped = await chain.step(hidden, positions, keep=keep)
            step_seconds = trio.current_time() - sent
            self._last = stepped
            result.rounds += 1
            self.receipts += stepped.receipts
            rollback = await attempt.checked.check_step(stepped)
            if rollback is not None:
                yield rollback
                return
            rows = stepped.output[0, len(ids) - 1 :]  # (1 + guesses, hidden)
            greedy = self.sampler.config.temperature == 0.0  # an argmax: screened logits do
            logits = await self.heads.logits(rows, greedy=greedy)  # (1 + guesses, vocab)
            verdict = accept(self.sampler, logits, draft, len(result.ids))  # by answer index
            if self.speculator is not None:
                decode = len(ids) == 1  # a prompt's step times the prompt, not the guesses
                self.speculator.record(len(draft), verdict.accepted, step_seconds, decode=decode)
                stats = self.speculator.statistics()
                result.speculation = stats if stats.drafted else None
            position += len(ids) + verdict.accepted
            waited = trio.current_time() - t0
            for i, token in enumerate(verdict.tokens):
                # a round's time is shared by the tokens it yields (per-token figures stay
                # comparable with plain decoding); the answer's first token took all of it
                first = not result.ids and i == 0
                yield self._accept(
                    token, waited if first else waited / len(verdict.tokens), stepped
                )
                if self._done or len(result.ids) >= self.max_new_tokens:
                    break
            context += verdict.tokens
            ids = [verdict.tokens[-1]]

    async def _draft(self, context: list[int], room: int) -> tuple[int, ...]:
        if self.speculator is None or room <= 0:
            return ()
        return await self.speculator.draft(context, room, self.sampler, len(self.result.ids))

    def _accept(self, token: int, seconds: float, stepped: StepResult) -> Token:
        result, text = self.result, self.text
        result.ids.append(token)
        result.timings.append(seconds)
        if len(result.ids) == 1:
            result.ttft = seconds
        piece, stopped = text.push(token) if text is not None else ("", False)
        result.route = self._route_dicts(stepped.route)
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

    def _route_dicts(self, route: list[Hop]) -> list[dict[str, Any]]:
        """`route_dicts` of ``route``, made again only when the route changed (hops are
        frozen; a replaced one is another object): every token reports it."""
        kept = self._route
        if (
            kept is None
            or len(kept[0]) != len(route)
            or any(a is not b for a, b in zip(kept[0], route, strict=True))
        ):
            kept = self._route = (route, route_dicts(route))
        return kept[1]

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
