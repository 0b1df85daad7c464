"""The gateway's ASGI app in-process, without a swarm: a fake model and a tokenizer seam.

Tokenizing a prompt runs in a worker thread, never on the event loop: while a tokenizer is
held mid-encode the loop still answers ``/health`` and refuses a bad request. A client that
leaves mid-generation cancels it: the slot is free again and
``swarm_api_cancelled_generations`` counts it (no completion tokens are counted); a
generation that runs to its end counts nothing there.

No process and no real-clock sleep: every wait is on an event, under a deadline that only
guards against hanging.
"""

from __future__ import annotations

import re
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from types import SimpleNamespace
from typing import Any

import httpx2 as httpx
import trio
from tokenizers import Tokenizer

from swarm.api.app import create_app
from swarm.api.config import GatewayConfig
from swarm.api.gateway import Gateway
from swarm.api.jobs import ModelFacts
from swarm.client.generation import Done, GenerationResult, StopReason, Token
from swarm.shards import load_tokenizer

from .conftest import MODEL

DEADLINE_S = 20.0  # guards against hanging only; the events below end every wait

Message = MutableMapping[str, Any]


class HeldTokenizer:
    """A tokenizer whose ``encode_batch`` waits, once entered, until ``release`` is set
    (or ``DEADLINE_S`` passes, which ``held_until_released`` records as False); it records
    the thread each call ran in. Everything else is the real tokenizer's."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner
        self.entered = threading.Event()
        self.release = threading.Event()
        self.threads: list[int] = []
        self.held_until_released: list[bool] = []

    def encode_batch(self, texts: list[str], **kwargs: Any) -> Any:
        self.threads.append(threading.get_ident())
        self.entered.set()
        self.held_until_released.append(self.release.wait(DEADLINE_S))
        return self.inner.encode_batch(texts, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class FakeStream:
    """`TokenStream`'s shape: ``tokens`` tokens, then `Done`; with ``hang`` it waits
    after the first token until cancelled. Records whether it was closed."""

    def __init__(self, tokens: int, hang: bool) -> None:
        self.tokens, self.hang = tokens, hang
        self.result = GenerationResult(stop_reason=StopReason.LENGTH)
        self.receipts: list[Any] = []
        self.closed = False
        self._iterator = self._events()

    async def __aenter__(self) -> FakeStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.closed = True
        await self._iterator.aclose()

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> Any:
        return await self._iterator.__anext__()

    async def _events(self) -> AsyncIterator[Any]:
        for i in range(self.tokens):
            self.result.ids.append(i)
            self.result.text = (self.result.text or "") + "a"
            yield Token(i, "a", 0.0)
            if self.hang:
                await trio.sleep_forever()
        yield Done(StopReason.LENGTH)


def _facts(tokenizer: Any = None) -> ModelFacts:
    real = load_tokenizer(MODEL)
    assert real is not None
    return ModelFacts(
        name="m",
        model_id="llama-x",
        tokenizer=tokenizer(real) if tokenizer else real,
        template=None,
        vocab_size=6144,
        max_length=64,
        default_max_tokens=16,
        default_verify="none",
    )


def _gateway(
    facts: ModelFacts, streams: list[FakeStream] | None = None, hang: bool = False
) -> Gateway:
    def stream(*args: object, **kwargs: object) -> FakeStream:
        made = FakeStream(tokens=3, hang=hang)
        if streams is not None:
            streams.append(made)
        return made

    model = SimpleNamespace(
        path=MODEL,
        model_config=SimpleNamespace(num_hidden_layers=6),
        stream=stream,
        bans=SimpleNamespace(banned=set),
        reputation=None,
    )
    return Gateway(model, GatewayConfig(), facts)  # type: ignore[arg-type]


def _counter(gateway: Gateway, name: str) -> float:
    text = gateway.metrics.render().decode()
    found = re.search(rf"^{name}_total (\S+)$", text, re.M)
    assert found, name
    return float(found.group(1))


async def test_tokenizing_runs_off_the_event_loop_which_keeps_answering() -> None:
    facts = _facts(HeldTokenizer)
    tokenizer = facts.tokenizer
    assert isinstance(tokenizer, HeldTokenizer)
    app = create_app(_gateway(facts))
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
    answers: dict[str, httpx.Response] = {}
    # fits by its characters, so it is tokenized; its tokens plus max_tokens pass max_length
    costly = {"model": "m", "prompt": "The list", "max_tokens": 64}
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:

        async def post_costly() -> None:
            answers["costly"] = await http.post("/v1/completions", json=costly)

        with trio.fail_after(DEADLINE_S * 2):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(post_costly)
                assert await trio.to_thread.run_sync(tokenizer.entered.wait, DEADLINE_S)
                # the tokenizer is held mid-encode now: the loop must still answer
                health = await http.get("/health")
                unknown = await http.post("/v1/completions", json={**costly, "model": "other"})
                held = not tokenizer.held_until_released
                tokenizer.release.set()
    assert held, "the loop answered only once the tokenizer was done: it ran on the loop"
    assert tokenizer.held_until_released == [True]
    assert tokenizer.threads and threading.get_ident() not in tokenizer.threads
    assert health.status_code == 503 and health.json()["num_blocks"] == 6  # no servers
    assert unknown.status_code == 404, unknown.text
    refused = answers["costly"]
    assert refused.status_code == 400 and refused.json()["error"]["code"] == (
        "context_length_exceeded"
    )


async def _post(
    app: Callable[[Message, Any, Any], Awaitable[None]],
    body: bytes,
    *,
    leave_after_first_piece: bool,
) -> list[Message]:
    """POST ``body`` to /v1/completions through ``app`` as an ASGI server would; with
    ``leave_after_first_piece`` the client disconnects once the first body piece came."""
    scope: Message = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }
    sent: list[Message] = []
    left = trio.Event()
    given = False

    async def receive() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)
        if leave_after_first_piece and message.get("body"):
            left.set()
        if message["type"] == "http.response.body" and not message.get("more_body"):
            left.set()  # the answer is complete: the connection may close

    with trio.fail_after(DEADLINE_S):
        await app(scope, receive, send)
    return sent


async def test_a_client_that_leaves_cancels_its_generation_and_frees_its_slot() -> None:
    streams: list[FakeStream] = []
    gateway = _gateway(_facts(), streams, hang=True)
    app = create_app(gateway)
    body = b'{"model": "m", "prompt": "The list", "max_tokens": 8, "stream": true}'
    sent = await _post(app, body, leave_after_first_piece=True)
    assert sent[0]["status"] == 200 and any(m.get("body") for m in sent[1:])
    assert [s.closed for s in streams] == [True]  # the generation's sessions were closed
    assert _counter(gateway, "swarm_api_cancelled_generations") == 1
    assert _counter(gateway, "swarm_api_completion_tokens") == 0  # not run to its end
    stats = gateway.admission.statistics()
    assert stats.running == 0 and stats.queued == 0


async def test_a_generation_that_ends_is_not_counted_as_cancelled() -> None:
    streams: list[FakeStream] = []
    gateway = _gateway(_facts(), streams)
    app = create_app(gateway)
    body = b'{"model": "m", "prompt": "The list", "max_tokens": 8, "stream": true}'
    sent = await _post(app, body, leave_after_first_piece=False)
    assert sent[0]["status"] == 200 and sent[-1]["body"].endswith(b"data: [DONE]\n\n")
    streamed = b"".join(m.get("body", b"") for m in sent[1:])
    assert b'"finish_reason": "length"' in streamed and b'"error"' not in streamed
    assert [s.closed for s in streams] == [True]
    assert _counter(gateway, "swarm_api_cancelled_generations") == 0
    assert _counter(gateway, "swarm_api_completion_tokens") == 3
    assert gateway.admission.statistics().running == 0
