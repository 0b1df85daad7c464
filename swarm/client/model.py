"""`AsyncRemoteModel`: generation through the swarm, for trio programs.

::

    async with AsyncRemoteModel.open(path, ClientConfig(initial_peers=("10.0.0.1:31337",))) as m:
        text = await m.generate("The capital of France is", max_new_tokens=16)
        async with m.stream("Once upon a time") as events:
            async for event in events:
                if isinstance(event, Token):
                    print(event.text, end="")

The head (embeddings, final norm, lm_head) and the tokenizer run locally; the decoder layers
run on the servers of a `Chain`. Generation is one prefill step with the whole prompt, then
one step per new token (positions ``0, 1, 2, ...``), run by the one token loop
(`swarm.client.generation.TokenLoop`); it stops at ``max_new_tokens``, at an end-of-sequence
id (which is included in the ids) or at a stop string (not included in the text).
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import NoReturn

import trio
from tokenizers import Tokenizer

from swarm.client.bans import BanList
from swarm.client.config import SPECULATION_MODES, ClientConfig
from swarm.client.discovery import Discovery, ServerDirectory, join_as_client, open_client_pool
from swarm.client.generation import (
    Attempt,
    Done,
    Event,
    GenerationResult,
    RolledBack,
    StopReason,
    Token,
    TokenLoop,
)
from swarm.client.heads import HeadBatcher
from swarm.client.load import OwnLoad
from swarm.client.sampling import Sampler, SamplingConfig
from swarm.client.speculation import DraftModel, Speculator
from swarm.client.text import load_tokenizer
from swarm.client.verifying import CheckedChain, VerifiedSessions, load_reputation
from swarm.directory import DHTEvidenceBoard
from swarm.errors import ConfigError, unwrap_group
from swarm.net.messages import Evidence
from swarm.net.pool import ConnectionPool
from swarm.net.transport import Transport
from swarm.shards import Head, ModelConfig, Quantization, load_head, model_id
from swarm.verify import EvidenceSink, Reputation, Verifier, parse_policy

__all__ = [
    "AsyncRemoteModel",
    "Done",
    "Event",
    "GenerationResult",
    "RolledBack",
    "StopReason",
    "Token",
    "TokenStream",
]

log = logging.getLogger(__name__)


def _reraise(exc: BaseException) -> NoReturn:
    inner = unwrap_group(exc)
    if inner is exc:
        raise exc
    raise inner from None


class TokenStream:
    """One generation's events (an async iterator of `Token`, `RolledBack` and a last `Done`)
    and its own `GenerationResult`.

    Use as ``async with model.stream(...) as events``; leaving the block early cancels the
    generation and closes its chains. ``result`` is complete once iteration ended;
    ``receipts`` holds the servers' signed receipts of this generation's steps, in order
    (every hop of every step, including steps redone after a rollback).
    """

    def __init__(self, events: AsyncGenerator[Event, None], loop: TokenLoop) -> None:
        self._events = events
        self.result = loop.result
        self.receipts = loop.receipts

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> Event:
        return await self._events.__anext__()

    async def aclose(self) -> None:
        await self._events.aclose()

    async def __aenter__(self) -> TokenStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncRemoteModel:
    """A model whose layers run on the swarm. Build it with `AsyncRemoteModel.open`."""

    def __init__(
        self,
        path: Path,
        config: ClientConfig,
        model_config: ModelConfig,
        head: Head,
        tokenizer: Tokenizer | None,
        pool: ConnectionPool,
        directory: ServerDirectory,
        evidence_sink: EvidenceSink | None = None,
        draft_model: DraftModel | None = None,
    ) -> None:
        self.path = path
        self.config = config
        self.model_config = model_config
        self.head = head
        self.tokenizer = tokenizer
        self.pool = pool
        self.directory = directory
        self.bans = BanList(
            config.failures.ban_base_s, config.failures.ban_backoff, config.failures.ban_max_s
        )
        self.rng = random.Random()
        self.load = OwnLoad(directory)  # routes see this client's own sessions at once
        self.sessions = VerifiedSessions(
            config,
            pool,
            self.load.directory,
            self.bans,
            self.rng,
            model_config.num_hidden_layers,
            evidence_sink,
        )
        self._evidence_sink = evidence_sink
        self._reputation: Reputation | None = None  # shared by per-generation policies
        self.heads = HeadBatcher(head)  # its service runs while `open`'s context is open
        self.draft_model = draft_model

    def speculator(self, mode: str | None = None) -> Speculator | None:
        """A new generation's `Speculator` for ``mode`` (None: ``config.speculation.mode``):
        None for ``off``. Raises `ConfigError` for a draft model other than the one this
        client loaded (``config.speculation.mode``): a request cannot make a client load
        files."""
        spec = self.config.speculation
        mode = spec.mode if mode is None else mode
        if mode not in SPECULATION_MODES and (self.draft_model is None or mode != spec.mode):
            raise ConfigError(
                f"speculative mode {mode!r}: use auto, off, ngram"
                + (f" or {spec.mode}" if self.draft_model is not None else "")
            )
        return Speculator.for_mode(
            mode, max_k=spec.max_k, fixed_k=spec.fixed_k, draft_model=self.draft_model
        )

    @property
    def verifier(self) -> Verifier | None:
        """The verification policy's state (audits, reputation), None under ``none``."""
        return self.sessions.verifier

    @property
    def reputation(self) -> Reputation | None:
        """The audit and ban record this client's checked generations share (None while no
        generation has been checked under a policy)."""
        if self.sessions.verifier is not None:
            return self.sessions.verifier.reputation
        return self._reputation

    @property
    def published_evidence(self) -> list[Evidence]:
        """Evidence this client signed against proven liars."""
        return self.sessions.published_evidence

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        path: str | Path,
        config: ClientConfig,
        *,
        transport: Transport | None = None,
        directory: ServerDirectory | None = None,
    ) -> AsyncIterator[AsyncRemoteModel]:
        """Load the head and tokenizer, join the DHT through ``config.initial_peers`` (unless a
        ``directory`` of servers is given) and open a connection pool on ``transport``.

        Raises `ShardError` for an unusable checkpoint, `ConfigError` without initial peers,
        `DHTError` if the DHT cannot be joined.
        """
        folder = Path(path)
        try:
            model_config = ModelConfig.from_pretrained(folder)
            head_quant = Quantization(config.head_quant)
            load = partial(load_head, folder, quant=head_quant, screen=config.head_screen)
            head = await trio.to_thread.run_sync(load)
            tokenizer = load_tokenizer(folder)
            mid = model_id(folder)
            draft = None
            if config.speculation.draft_model is not None:
                name = config.speculation.draft_model
                draft = await trio.to_thread.run_sync(DraftModel.load, name, tokenizer)
            async with open_client_pool(config, transport) as pool, trio.open_nursery() as nursery:
                if directory is not None:
                    model = cls(folder, config, model_config, head, tokenizer, pool, directory)
                    model.draft_model = draft
                    await nursery.start(model.heads.run)
                    yield model
                    nursery.cancel_scope.cancel()
                    return
                async with join_as_client(config, pool) as (_, dht):
                    found = Discovery(dht, pool, mid, model_config.num_hidden_layers, config)
                    board = DHTEvidenceBoard(dht, timeout=config.request_timeout)
                    model = cls(
                        folder, config, model_config, head, tokenizer, pool, found, board, draft
                    )
                    await nursery.start(model.heads.run)
                    yield model
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            _reraise(group)

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a prompt. Raises `ConfigError` for text without a tokenizer, or ids
        outside the vocabulary, or an empty prompt."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigError(f"{self.path} has no tokenizer.json: give token ids, not text")
            ids = list(self.tokenizer.encode(prompt).ids)
        else:
            ids = [int(i) for i in prompt]
        vocab = self.model_config.vocab_size
        if not ids:
            raise ConfigError("the prompt is empty")
        if any(not 0 <= i < vocab for i in ids):
            raise ConfigError(f"token ids must be in [0, {vocab})")
        return ids

    def stream(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 32,
        sampling: SamplingConfig | None = None,
        stop: Sequence[str] = (),
        *,
        verify: str | None = None,
        speculative: str | Speculator | None = None,
    ) -> TokenStream:
        """Generate token by token: ``async with model.stream(...) as events: async for ...``
        yields `Token` s, a `RolledBack` after a proven lie, and a last `Done`.

        The returned `TokenStream` owns this generation's `GenerationResult` (``.result``),
        filled as tokens arrive; no state of one generation is kept on the model, so any
        number of tasks may stream at once. Raises `ConfigError` for bad arguments (here, at
        once); iterating raises `RoutingError` / `SessionError` when the swarm cannot run the
        layers.

        Under a verification policy a proven lie rolls the generation back to the liar's first
        bad position and goes on from a fresh chain without it: a `RolledBack` event says how
        many tokens (and which text) stand; the tokens after it replace what was yielded
        after that position. ``result.ids`` and ``result.rollbacks`` hold the final tokens
        and how often that happened. Under ``optimistic`` the check runs after the last
        token, before `Done`.

        ``result.verification`` counts this generation's audits and detections alone (the
        client's totals are ``model.verifier``'s); ``verify`` (a policy, see
        `swarm.verify.policy`) checks this generation under that policy instead of
        ``config.verify``. Bans and reputation stay shared with the client's other
        generations.

        ``speculative`` (``auto``, ``off``, ``ngram``, or the draft model of
        ``config.speculation``) overrides ``config.speculation.mode`` for this generation:
        guessed tokens checked several per round trip; the tokens are those of plain
        decoding (greedy exactly; sampling the same for a seed). A `Speculator` object
        (one per generation) is used as it is: benchmarks and tests bring their drafters.
        """
        ids = self.encode(prompt)
        if max_new_tokens < 1:
            raise ConfigError("max_new_tokens must be at least 1")
        if stop and self.tokenizer is None:
            raise ConfigError("stop strings need a tokenizer; this checkpoint has none")
        sessions = self.sessions if verify is None else self._sessions_for(verify)
        sampler = Sampler(sampling or SamplingConfig())
        eos = self.model_config.eos_token_id
        loop = TokenLoop(
            self.head,
            eos,
            self.tokenizer,
            sampler,
            max_new_tokens,
            stop,
            heads=self.heads,
            speculator=(
                speculative if isinstance(speculative, Speculator) else self.speculator(speculative)
            ),
        )
        attempts = _Fresh(self, sessions, ids, len(ids) + max_new_tokens)
        return TokenStream(self._run(loop, attempts, sessions), loop)

    @asynccontextmanager
    async def open_chain(
        self,
        max_length: int,
        sessions: VerifiedSessions | None = None,
        verifier: Verifier | None = None,
    ) -> AsyncIterator[CheckedChain]:
        """A verified chain of ``max_length`` positions for one generation, counted in this
        client's own load while it is open (every generation and chat turn opens its chains
        here, one plan at a time, so each plan sees the chains opened before it); its checks
        are counted by ``verifier`` (a generation's own, default: the client's)."""
        sessions = sessions or self.sessions
        async with AsyncExitStack() as stack:
            async with self.load.opening():
                checked = await stack.enter_async_context(sessions.open(max_length, verifier))
                peers = self.load.add(hop.server.peer_id for hop in checked.chain.route)
            stack.callback(self.load.remove, peers)
            yield checked

    def _sessions_for(self, verify: str) -> VerifiedSessions:
        """Sessions under ``verify`` for one generation (raises `ConfigError` for a bad
        policy), sharing this client's pool, directory, bans and reputation."""
        parse_policy(verify)
        config = dataclasses.replace(self.config, verify=verify)
        if self.sessions.verifier is not None:
            reputation = self.sessions.verifier.reputation
        else:
            if self._reputation is None:
                self._reputation = load_reputation(config)
            reputation = self._reputation
        return VerifiedSessions(
            config,
            self.pool,
            self.load.directory,
            self.bans,
            self.rng,
            self.model_config.num_hidden_layers,
            self._evidence_sink,
            reputation,
        )

    async def _run(
        self, loop: TokenLoop, attempts: _Fresh, sessions: VerifiedSessions
    ) -> AsyncGenerator[Event, None]:
        own = attempts.verifier
        try:
            async for event in loop.events(attempts):
                if isinstance(event, Done) and own is not None:
                    loop.result.verification = own.statistics()  # this generation's alone
                    sessions.save_reputation()
                yield event
        finally:
            sessions.fold(own)  # the client's totals (``model.verifier``)

    async def generate_detailed(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 32,
        sampling: SamplingConfig | None = None,
        stop: Sequence[str] = (),
        *,
        speculative: str | Speculator | None = None,
    ) -> GenerationResult:
        """Generate and return ids, text, route and timings. Raises what `stream` raises."""
        async with self.stream(
            prompt, max_new_tokens, sampling, stop, speculative=speculative
        ) as events:
            async for _ in events:
                pass
        return events.result

    async def generate(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 32,
        sampling: SamplingConfig | None = None,
        stop: Sequence[str] = (),
        *,
        return_text: bool | None = None,
    ) -> str | list[int]:
        """The new text (``return_text`` True; default when the prompt is text) or new ids.

        Raises `ConfigError` if text is asked of a checkpoint without tokenizer, and what
        `stream` raises.
        """
        if return_text is None:
            return_text = isinstance(prompt, str)
        if return_text and self.tokenizer is None:
            raise ConfigError(f"{self.path} has no tokenizer.json: ask for ids")
        result = await self.generate_detailed(prompt, max_new_tokens, sampling, stop)
        return (result.text or "") if return_text else list(result.ids)


class _Fresh:
    """The `Attempts` of `AsyncRemoteModel.stream`: every attempt on a fresh chain, fed the
    prompt and the answer so far from position 0."""

    def __init__(
        self, model: AsyncRemoteModel, sessions: VerifiedSessions, prompt: list[int], length: int
    ) -> None:
        self.model, self.sessions, self.prompt, self.length = model, sessions, prompt, length
        self.verifier = sessions.for_generation()  # this generation's audits and detections

    @asynccontextmanager
    async def open(self, answer: list[int]) -> AsyncIterator[Attempt]:
        async with self.model.open_chain(self.length, self.sessions, self.verifier) as checked:
            yield Attempt(checked, 0, self.prompt + answer, len(answer))

    def finished(self, attempt: Attempt, answer: list[int]) -> None:
        pass
