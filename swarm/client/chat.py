"""`Chat`: a multi-turn conversation over one inference session kept open across turns.

::

    async with AsyncRemoteModel.open(path, config) as model, Chat.open(model) as chat:
        async for token in chat.send("What is the capital of France?"):
            print(token.text, end="")
        answer = await chat.say("And of Italy?")

Each turn renders the whole conversation with the model's chat template (see
:mod:`swarm.shards.chat_template`), but sends the servers only what the session has not
seen yet: the text after what is already in its KV caches (the previous prompts and answers),
tokenized alone. When the new rendering does not begin with what was sent (a template that
rewrites earlier turns), or a verification check proves a lie, the turn starts over on a fresh
session with the whole conversation (``statistics().reprefills`` counts those; tokens of
that turn already yielded are then yielded again, recomputed). Server
failures are recovered inside the session, across turns. An answer ends at an end-of-turn id
(the model's eos ids) or at ``max_new_tokens``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import torch
import trio

from swarm.client.model import AsyncRemoteModel, Token
from swarm.client.sampling import Sampler, SamplingConfig
from swarm.client.session import InferenceSession
from swarm.client.text import StopText
from swarm.errors import ConfigError
from swarm.shards import ChatTemplate, load_chat_template

__all__ = ["Chat", "ChatStatistics", "Turn"]


@dataclass(frozen=True)
class Turn:
    """One finished turn: the ids sent to the servers for it (new prompt tokens, after the
    previous answer's last token; the whole conversation when ``fresh``, i.e. on a new
    session), the answer's ids and text, and why it ended."""

    sent: tuple[int, ...]
    answer: tuple[int, ...]
    text: str
    stop_reason: str  # "eos" or "length"
    fresh: bool


@dataclass(frozen=True)
class ChatStatistics:
    """Turns so far, the ids the session holds, and how often a turn re-sent everything."""

    turns: tuple[Turn, ...]
    cached_tokens: int
    reprefills: int


@dataclass
class _State:
    """What the open session holds: its ids (``fed``), the text they spell, and the last
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
        self._session: InferenceSession | None = None
        self._session_stack: AsyncExitStack | None = None
        self._state = _State()
        self._steps = 0
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
                await chat._close_session()

    def statistics(self) -> ChatStatistics:
        return ChatStatistics(tuple(self._turns), len(self._state.fed), self._reprefills)

    async def reset(self) -> None:
        """Forget the conversation (the system message stays) and close the session."""
        self.messages = [m for m in self.messages if m["role"] == "system"]
        await self._close_session()

    async def say(
        self, message: str, max_new_tokens: int = 256, sampling: SamplingConfig | None = None
    ) -> str:
        """Send ``message`` and return the whole answer's text. Raises what `send` raises."""
        async for _ in self.send(message, max_new_tokens, sampling):
            pass
        return self._turns[-1].text

    async def send(
        self, message: str, max_new_tokens: int = 256, sampling: SamplingConfig | None = None
    ) -> AsyncGenerator[Token, None]:
        """Add a user ``message`` and stream the answer, token by token (wrap in
        ``contextlib.aclosing`` if you may stop early).

        If the iteration is stopped early (or cancelled) the turn is dropped from the
        conversation and the session closed (the next turn re-sends everything).

        Raises `ConfigError` if the conversation would exceed ``max_length`` (start over
        with `reset`), `RoutingError` / `SessionError` when the swarm cannot run the layers.
        """
        if max_new_tokens < 1:
            raise ConfigError("max_new_tokens must be at least 1")
        messages = [*self.messages, {"role": "user", "content": message}]
        prompt = self.template.render(messages, add_generation_prompt=True)
        finished = False
        try:
            while True:
                turn = _TurnRun(self, prompt, max_new_tokens, sampling)
                async for token in turn.run():
                    yield token
                if turn.rollback:
                    self._reprefills += 1
                    await self._close_session()
                    continue
                break
            finished = True
        finally:
            if not finished:
                with trio.CancelScope(shield=True):
                    await self._close_session()
        self.messages = [*messages, {"role": "assistant", "content": turn.text.text}]
        self._turns.append(turn.finish())

    # ---- the session ----

    async def _session_for(self, prompt: str) -> tuple[InferenceSession, list[int]]:
        """The open session (or a fresh one) and the ids to send for ``prompt``."""
        state = self._state
        if self._session is not None and not prompt.startswith(state.text):
            self._reprefills += 1
            await self._close_session()
        if self._session is None:
            stack = AsyncExitStack()
            self._session = await stack.enter_async_context(
                self.model.sessions.open(self.max_length)
            )
            self._session_stack, self._state, self._steps = stack, _State(), 0
            state = self._state
        new = self._tokenizer.encode(prompt[len(state.text) :], add_special_tokens=False).ids
        return self._session, [*state.pending, *new]

    async def _close_session(self) -> None:
        stack, self._session, self._session_stack = self._session_stack, None, None
        self._state = _State()
        if stack is not None:
            await stack.aclose()


class _TurnRun:
    """One attempt at a turn: the step loop over the chat's session."""

    def __init__(
        self, chat: Chat, prompt: str, max_new_tokens: int, sampling: SamplingConfig | None
    ) -> None:
        self.chat = chat
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.sampler = Sampler(sampling or SamplingConfig())
        self.text = StopText(chat._tokenizer)
        self.sent: list[int] = []
        self.answer: list[int] = []
        self.stop_reason = "length"
        self.rollback = False
        self.fresh = False

    async def run(self) -> AsyncGenerator[Token, None]:
        chat, head = self.chat, self.chat.model.head
        session, ids = await chat._session_for(self.prompt)
        self.sent = list(ids)
        state = chat._state
        self.fresh = not state.fed
        if len(state.fed) + len(ids) + self.max_new_tokens > chat.max_length:
            raise ConfigError(
                f"the conversation would pass max_length={chat.max_length} tokens; reset it"
            )
        eos = set(chat.model.model_config.eos_token_id)
        while True:
            started = trio.current_time()
            position = len(state.fed)
            positions = torch.arange(position, position + len(ids)).unsqueeze(0)  # (1, n)
            out = await session.step(head.embed(torch.tensor([ids])), positions)  # (1, n, hidden)
            state.fed += ids
            rollback = await chat.model.sessions.check_step(session, len(ids), chat._steps)
            chat._steps += 1
            if rollback is not None:
                self.rollback = True
                return
            token = int(self.sampler(head.logits(out[:, -1:])[:, -1])[0])
            self.answer.append(token)
            piece, _ = self.text.push(token)
            done = token in eos or len(self.answer) == self.max_new_tokens
            if done:
                piece += self.text.flush()
            yield Token(token, piece, trio.current_time() - started)
            if done:
                self.stop_reason = "eos" if token in eos else "length"
                break
            ids = [token]
        if await chat.model.sessions.challenge(session, chat._steps) is not None:
            self.rollback = True
            return
        state.pending = [self.answer[-1]]
        spelled = chat._tokenizer.decode(self.answer, skip_special_tokens=False)
        state.text = self.prompt + spelled

    def finish(self) -> Turn:
        return Turn(
            tuple(self.sent), tuple(self.answer), self.text.text, self.stop_reason, self.fresh
        )
