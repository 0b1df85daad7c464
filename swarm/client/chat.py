"""`Chat`: a multi-turn conversation over one chain kept open across turns.

::

    async with AsyncRemoteModel.open(path, config) as model, Chat.open(model) as chat:
        async for event in chat.send("What is the capital of France?"):
            if isinstance(event, Token):
                print(event.text, end="")
        answer = await chat.say("And of Italy?")

Each turn renders the whole conversation with the model's chat template (see
:mod:`swarm.shards.chat_template`), but sends the servers only what the chain has not seen
yet: the text after what is already in its KV caches (the previous prompts and answers),
tokenized alone. A turn runs the same token loop as `AsyncRemoteModel.stream`
(`swarm.client.generation.TokenLoop`: same events, receipts, route, timings and own-load
accounting). When the new rendering does not begin with what was sent (a template that
rewrites earlier turns), or a verification check proves a lie (a `RolledBack` event), the
turn goes on from a fresh chain fed the whole conversation (``statistics().reprefills``
counts those). Server failures are recovered inside the chain, across turns. An answer ends
at an end-of-turn id (the model's eos ids) or at ``max_new_tokens``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from swarm.client.generation import Attempt, Event, StopReason, TokenLoop
from swarm.client.model import AsyncRemoteModel
from swarm.client.sampling import Sampler, SamplingConfig
from swarm.client.verifying import CheckedChain
from swarm.errors import ConfigError
from swarm.net.messages import Receipt
from swarm.shards import ChatTemplate, load_chat_template

__all__ = ["Chat", "ChatStatistics", "Turn"]


@dataclass(frozen=True)
class Turn:
    """One finished turn: the ids sent to the servers for it (new prompt tokens, after the
    previous answer's last token; the whole conversation when ``fresh``, i.e. on a new
    chain), the answer's ids and text, why it ended, and like any generation its route,
    per-token timings, the servers' signed receipts and its rollbacks."""

    sent: tuple[int, ...]
    answer: tuple[int, ...]
    text: str
    stop_reason: StopReason
    fresh: bool
    route: tuple[dict[str, Any], ...] = ()
    timings: tuple[float, ...] = ()
    receipts: tuple[Receipt, ...] = ()
    rollbacks: int = 0


@dataclass(frozen=True)
class ChatStatistics:
    """Turns so far, the ids the chain holds, and how often a turn re-sent everything."""

    turns: tuple[Turn, ...]
    cached_tokens: int
    reprefills: int


@dataclass
class _State:
    """What the open chain holds: its ids (``fed``), the text they spell, and the last
    sampled id, which the next step feeds."""

    fed: list[int] = field(default_factory=list)
    text: str = ""
    pending: list[int] = field(default_factory=list)


class Chat:
    """A conversation with ``model``; build it with `Chat.open`. One turn at a time."""

    def __init__(self, model: AsyncRemoteModel, template: ChatTemplate, max_length: int) -> None:
        if model.tokenizer is None:
            raise ConfigError(f"{model.path} has no tokenizer: a chat needs one")
        self.model = model
        self.template = template
        self.max_length = max_length
        self.messages: list[dict[str, str]] = []
        self._tokenizer = model.tokenizer
        self._checked: CheckedChain | None = None
        self._stack: AsyncExitStack | None = None
        self._state = _State()
        self._turns: list[Turn] = []
        self._reprefills = 0

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        model: AsyncRemoteModel,
        *,
        max_length: int = 2048,
        system: str | None = None,
        template: ChatTemplate | None = None,
    ) -> AsyncIterator[Chat]:
        """A chat over ``model`` (its checkpoint's chat template unless ``template`` is given),
        whose session holds up to ``max_length`` tokens; ``system`` starts the conversation.

        Raises `ConfigError` when the checkpoint has no tokenizer or no chat template.
        """
        template = template or load_chat_template(model.path)
        if template is None:
            raise ConfigError(f"{model.path} has no chat template (a base model?)")
        chat = cls(model, template, max_length)
        if system:
            chat.messages.append({"role": "system", "content": system})
        try:
            yield chat
        finally:
            with trio.CancelScope(shield=True):
                await chat._close()

    def statistics(self) -> ChatStatistics:
        return ChatStatistics(tuple(self._turns), len(self._state.fed), self._reprefills)

    async def reset(self) -> None:
        """Forget the conversation (the system message stays) and close the session."""
        self.messages = [m for m in self.messages if m["role"] == "system"]
        await self._close()

    async def say(
        self, message: str, max_new_tokens: int = 256, sampling: SamplingConfig | None = None
    ) -> str:
        """Send ``message`` and return the whole answer's text. Raises what `send` raises."""
        async for _ in self.send(message, max_new_tokens, sampling):
            pass
        return self._turns[-1].text

    async def send(
        self, message: str, max_new_tokens: int = 256, sampling: SamplingConfig | None = None
    ) -> AsyncGenerator[Event, None]:
        """Add a user ``message`` and stream the answer's events (`Token`, `RolledBack`, a
        last `Done`; wrap in ``contextlib.aclosing`` if you may stop early). The finished
        turn is ``statistics().turns[-1]``.

        If the iteration is stopped early (or cancelled) the turn is dropped from the
        conversation and the chain closed (the next turn re-sends everything).

        Raises `ConfigError` if the conversation would exceed ``max_length`` (start over
        with `reset`), `RoutingError` / `SessionError` when the swarm cannot run the layers.
        """
        if max_new_tokens < 1:
            raise ConfigError("max_new_tokens must be at least 1")
        messages = [*self.messages, {"role": "user", "content": message}]
        prompt = self.template.render(messages, add_generation_prompt=True)
        model = self.model
        sampler = Sampler(sampling or SamplingConfig())
        eos = model.model_config.eos_token_id
        loop = TokenLoop(
            model.head,
            eos,
            self._tokenizer,
            sampler,
            max_new_tokens,
            heads=model.heads,
            speculator=model.speculator(),
        )
        turn = _TurnAttempts(self, prompt, max_new_tokens)
        finished = False
        try:
            async for event in loop.events(turn):
                yield event
            finished = True
        finally:
            if not finished:
                with trio.CancelScope(shield=True):
                    await self._close()
        result = loop.result
        text = result.text or ""
        self.messages = [*messages, {"role": "assistant", "content": text}]
        done = Turn(
            tuple(turn.sent),
            tuple(result.ids),
            text,
            result.stop_reason,
            turn.fresh,
            tuple(result.route),
            tuple(result.timings),
            tuple(loop.receipts),
            result.rollbacks,
        )
        self._turns.append(done)

    # ---- the chain ----

    async def _chain_for(self, prompt: str, fresh: bool) -> tuple[CheckedChain, list[int]]:
        """The open chain (or a fresh one) and the ids of ``prompt`` it has not seen."""
        state = self._state
        if self._checked is not None and (fresh or not prompt.startswith(state.text)):
            self._reprefills += 1
            await self._close()
        if self._checked is None:
            stack = AsyncExitStack()
            self._checked = await stack.enter_async_context(self.model.open_chain(self.max_length))
            self._stack, self._state = stack, _State()
            state = self._state
        new = self._tokenizer.encode(prompt[len(state.text) :], add_special_tokens=False).ids
        return self._checked, [*state.pending, *new]

    async def _close(self) -> None:
        stack, self._checked, self._stack = self._stack, None, None
        self._state = _State()
        if stack is not None:
            await stack.aclose()


class _TurnAttempts:
    """The `Attempts` of one turn: the chat's open chain first; after a proven lie a fresh
    chain fed the whole conversation and the answer that stands."""

    def __init__(self, chat: Chat, prompt: str, max_new_tokens: int) -> None:
        self.chat = chat
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.sent: list[int] = []
        self.fresh = False
        self.tries = 0

    @asynccontextmanager
    async def open(self, answer: list[int]) -> AsyncIterator[Attempt]:
        chat = self.chat
        checked, ids = await chat._chain_for(self.prompt, fresh=self.tries > 0)
        self.tries += 1
        state = chat._state
        feed = [*ids, *answer]
        if len(state.fed) + len(feed) + self.max_new_tokens - len(answer) > chat.max_length:
            raise ConfigError(
                f"the conversation would pass max_length={chat.max_length} tokens; reset it"
            )
        self.sent, self.fresh = list(ids), not state.fed  # the last attempt's count
        yield Attempt(checked, len(state.fed), feed, len(answer))

    def finished(self, attempt: Attempt, answer: list[int]) -> None:
        """The chain now holds the feed and every answer id but the last (fed next turn)."""
        state = self.chat._state
        state.fed += [*attempt.feed, *answer[attempt.answer : -1]]
        state.pending = answer[-1:]
        spelled = self.chat._tokenizer.decode(answer, skip_special_tokens=False)
        state.text = self.prompt + spelled
