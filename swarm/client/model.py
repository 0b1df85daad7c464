"""`AsyncRemoteModel`: generation through the swarm, for trio programs.

::

    async with AsyncRemoteModel.open(path, ClientConfig(initial_peers=("10.0.0.1:31337",))) as m:
        text = await m.generate("The capital of France is", max_new_tokens=16)
        async with m.stream("Once upon a time") as tokens:
            async for token in tokens:
                print(token.text, end="")

The head (embeddings, final norm, lm_head) and the tokenizer run locally; the decoder layers
run on the servers of an `InferenceSession`. Generation is one prefill step with the whole
prompt, then one step per new token (positions ``0, 1, 2, ...``); it stops at
``max_new_tokens``, at an end-of-sequence id (which is included in the ids) or at a stop
string (not included in the text).
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
import trio
from tokenizers import Tokenizer

from swarm.client.bans import BanList
from swarm.client.config import ClientConfig
from swarm.client.discovery import Discovery, ServerDirectory
from swarm.client.load import OwnLoad
from swarm.client.routing import Hop
from swarm.client.sampling import Sampler, SamplingConfig
from swarm.client.session import InferenceSession
from swarm.client.text import StopText, load_tokenizer
from swarm.client.verifying import VerifiedSessions, load_reputation
from swarm.dht import DHTConfig, DHTNode
from swarm.directory import DHTEvidenceBoard
from swarm.errors import ConfigError, unwrap_group
from swarm.net.messages import Evidence, Receipt
from swarm.net.pool import ConnectionPool, open_connection_pool
from swarm.net.transport import Transport
from swarm.shards import Head, ModelConfig, load_head, model_id
from swarm.verify import EvidenceSink, Reputation, Verifier, VerifierStatistics, parse_policy

__all__ = ["AsyncRemoteModel", "GenerationResult", "Token", "TokenStream"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Token:
    """One generated token: its id and the text it adds ("" when held back or no tokenizer)."""

    id: int
    text: str
    seconds: float  # since the step's input was ready (the first: since generation began)


@dataclass
class GenerationResult:
    """Everything about one generation (what ``swarm generate --json`` prints)."""

    ids: list[int] = field(default_factory=list)
    text: str | None = None
    route: list[dict[str, Any]] = field(default_factory=list)
    timings: list[float] = field(default_factory=list)
    ttft: float = 0.0
    recoveries: int = 0
    stop_reason: str = "length"
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


def _reraise(exc: BaseException) -> NoReturn:
    inner = unwrap_group(exc)
    if inner is exc:
        raise exc
    raise inner from None


class TokenStream:
    """One generation's tokens (an async iterator) and its own `GenerationResult`.

    Use as ``async with model.stream(...) as tokens``; leaving the block early cancels the
    generation and closes its sessions. ``result`` is complete once iteration ended;
    ``receipts`` holds the servers' signed receipts of this generation's steps, in order
    (every hop of every step, including steps redone after a rollback).
    """

    def __init__(
        self,
        tokens: AsyncGenerator[Token, None],
        result: GenerationResult,
        receipts: list[Receipt] | None = None,
    ) -> None:
        self._tokens = tokens
        self.result = result
        self.receipts = receipts if receipts is not None else []

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> Token:
        return await self._tokens.__anext__()

    async def aclose(self) -> None:
        await self._tokens.aclose()

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
    ) -> None:
        self.path = path
        self.config = config
        self.model_config = model_config
        self.head = head
        self.tokenizer = tokenizer
        self.pool = pool
        self.directory = directory
        self.bans = BanList(config.ban_base_s, config.ban_backoff, config.ban_max_s)
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
            head = await trio.to_thread.run_sync(load_head, folder)
            tokenizer = load_tokenizer(folder)
            mid = model_id(folder)
            async with open_connection_pool(
                config.identity, transport=transport, swarm_key=config.swarm_key, config=config.net
            ) as pool:
                if directory is not None:
                    yield cls(folder, config, model_config, head, tokenizer, pool, directory)
                    return
                if not config.initial_peers:
                    raise ConfigError("no initial peers: give the host:port of a DHT node")
                dht_config = DHTConfig(  # a client: nobody adds it to a routing table
                    initial_peers=config.initial_peers,
                    swarm_key=config.swarm_key,
                    client_only=True,
                )
                async with DHTNode.open(config.identity, dht_config) as dht:
                    found = Discovery(dht, pool, mid, model_config.num_hidden_layers, config)
                    board = DHTEvidenceBoard(dht, timeout=config.request_timeout)
                    yield cls(folder, config, model_config, head, tokenizer, pool, found, board)
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
    ) -> TokenStream:
        """Generate token by token: ``async with model.stream(...) as tokens: async for ...``.

        The returned `TokenStream` owns this generation's `GenerationResult` (``.result``),
        filled as tokens arrive; no state of one generation is kept on the model, so any
        number of tasks may stream at once. Raises `ConfigError` for bad arguments (here, at
        once); iterating raises `RoutingError` / `SessionError` when the swarm cannot run the
        layers.

        Under a verification policy a proven lie rolls the generation back to the liar's first
        bad position and goes on from a fresh session without it: tokens already yielded after
        that position are then yielded again (recomputed); ``result.ids`` and
        ``result.rollbacks`` hold the final tokens and how often that happened. Under
        ``optimistic`` the check runs after the last token, before the iteration ends.

        ``verify`` (a policy, see `swarm.verify.policy`) checks this generation alone under
        that policy instead of ``config.verify``: it gets its own verifier, so
        ``result.verification`` counts only its own audits and detections, while bans and
        reputation stay shared with the client's other generations.
        """
        ids = self.encode(prompt)
        if max_new_tokens < 1:
            raise ConfigError("max_new_tokens must be at least 1")
        if stop and self.tokenizer is None:
            raise ConfigError("stop strings need a tokenizer; this checkpoint has none")
        sessions = self.sessions if verify is None else self._sessions_for(verify)
        result = GenerationResult(text="" if self.tokenizer is not None else None)
        gen = _Generation(self, sessions, ids, max_new_tokens, sampling, stop, result)
        return TokenStream(self._run(gen), result, gen.receipts)

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

    async def _run(self, gen: _Generation) -> AsyncGenerator[Token, None]:
        started = trio.current_time()
        sessions = gen.sessions
        while True:
            async with AsyncExitStack() as stack:
                async with self.load.opening():  # one plan at a time: each sees the last
                    session = await stack.enter_async_context(
                        sessions.open(len(gen.prompt) + gen.max_new_tokens)
                    )
                    peers = self.load.add(hop.server.peer_id for hop in session.route)
                stack.callback(self.load.remove, peers)
                async for token in gen.run(session, started):
                    yield token
                if gen.rollback is None and sessions.verifier is not None:
                    await gen.challenge(session)
            if gen.rollback is None:
                break
            gen.roll_back()
        if sessions.verifier is not None:
            gen.result.verification = sessions.verifier.statistics()
            sessions.save_reputation()

    async def generate_detailed(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 32,
        sampling: SamplingConfig | None = None,
        stop: Sequence[str] = (),
    ) -> GenerationResult:
        """Generate and return ids, text, route and timings. Raises what `stream` raises."""
        async with self.stream(prompt, max_new_tokens, sampling, stop) as tokens:
            async for _ in tokens:
                pass
        return tokens.result

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


class _Generation:
    """One generation's token loop, restartable after a verification rollback."""

    def __init__(
        self,
        model: AsyncRemoteModel,
        sessions: VerifiedSessions,
        prompt: list[int],
        max_new_tokens: int,
        sampling: SamplingConfig | None,
        stop: Sequence[str],
        result: GenerationResult,
    ) -> None:
        self.model = model
        self.sessions = sessions
        self.receipts: list[Receipt] = []
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.sampler = Sampler(sampling or SamplingConfig())
        self.stop = stop
        self.result = result
        self.text = StopText(model.tokenizer, stop) if model.tokenizer is not None else None
        self.eos = set(model.model_config.eos_token_id)
        self.done = False
        self.rollback: int | None = None  # token position where a proven lie began
        self.steps = 0

    async def run(self, session: InferenceSession, started: float) -> AsyncIterator[Token]:
        """Steps until done, or until a check proves a lie (then ``rollback`` is set)."""
        result, head = self.result, self.model.head
        self.rollback = None
        new_ids = torch.tensor([self.prompt + result.ids])  # (1, n)
        position = 0
        while not self.done and len(result.ids) < self.max_new_tokens:
            t0 = trio.current_time() if result.ids else started
            n = new_ids.shape[1]
            positions = torch.arange(position, position + n).unsqueeze(0)  # (1, n)
            out = await session.step(head.embed(new_ids), positions)  # (1, n, hidden)
            position += n
            for k in range(len(session.route)):
                receipt = session.hop_progress(k).last_receipt
                if receipt is not None:
                    self.receipts.append(receipt)
            self.rollback = await self.sessions.check_step(session, n, self.steps)
            self.steps += 1
            if self.rollback is not None:
                return
            token = int(self.sampler(head.logits(out[:, -1:])[:, -1])[0])
            yield self._accept(token, trio.current_time() - t0, session)
            new_ids = torch.tensor([[token]])  # (1, 1)

    def _accept(self, token: int, seconds: float, session: InferenceSession) -> Token:
        result, text = self.result, self.text
        result.ids.append(token)
        result.timings.append(seconds)
        if len(result.ids) == 1:
            result.ttft = seconds
        piece, stopped = text.push(token) if text is not None else ("", False)
        if text is not None:
            result.text = text.text
        result.route = route_dicts(session.route)
        result.recoveries = max(result.recoveries, session.recoveries)
        if stopped:
            result.stop_reason, self.done = "stop", True
        elif token in self.eos:
            result.stop_reason, self.done = "eos", True
            piece += text.flush() if text is not None else ""
        elif len(result.ids) == self.max_new_tokens and text is not None:
            piece += text.flush()
        return Token(token, piece, seconds)

    async def challenge(self, session: InferenceSession) -> None:
        """Optimistic policy: the dispute window before the result is final."""
        self.rollback = await self.sessions.challenge(session, self.steps)

    def roll_back(self) -> None:
        """Drop every token computed from the lie (positions >= ``rollback``)."""
        assert self.rollback is not None
        keep = max(0, self.rollback - len(self.prompt) + 1)
        result = self.result
        del result.ids[keep:]
        del result.timings[keep:]
        result.rollbacks += 1
        result.stop_reason, self.done = "length", False
        if self.model.tokenizer is not None:
            self.text = StopText(self.model.tokenizer, self.stop)
            for token in result.ids:
                self.text.push(token)
            result.text = self.text.text
