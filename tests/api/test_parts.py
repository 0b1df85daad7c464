"""The gateway's parts without a swarm: admission, the receipt store, request checking."""

from __future__ import annotations

import pytest
import torch
import trio
from pydantic import ValidationError

from swarm.api.admission import Admission
from swarm.api.errors import ApiError, error_from_exception
from swarm.api.jobs import ModelFacts, chat_job, completion_job
from swarm.api.middleware import endpoint_label
from swarm.api.receipts import ReceiptStore
from swarm.api.schemas import ChatRequest, CompletionRequest
from swarm.errors import ConfigError, RoutingError
from swarm.identity import Identity
from swarm.shards import ChatTemplate, load_tokenizer
from swarm.types import LayerRange
from swarm.verify import make_receipt

from .conftest import MODEL


def _facts(template: ChatTemplate | None = None, max_length: int = 64) -> ModelFacts:
    tokenizer = load_tokenizer(MODEL)
    assert tokenizer is not None
    return ModelFacts(
        name="m",
        model_id="llama-x",
        tokenizer=tokenizer,
        template=template,
        vocab_size=6144,
        max_length=max_length,
        default_max_tokens=16,
        default_verify="none",
    )


async def test_admission_runs_n_queues_q_then_refuses() -> None:
    admission = Admission(max_concurrent=2, queue=1, retry_after_s=3, queue_timeout_s=0.5)
    tickets = [admission.reserve() for _ in range(3)]
    with pytest.raises(ApiError) as refused:
        admission.reserve()
    assert refused.value.status == 429 and refused.value.headers == {"Retry-After": "3"}
    await tickets[0].__aenter__()
    await tickets[1].__aenter__()
    assert admission.statistics().running == 2 and admission.statistics().queued == 1
    with pytest.raises(ApiError):  # the queued one waits past queue_timeout_s
        await tickets[2].__aenter__()
    assert admission.statistics().queued == 0 and admission.statistics().rejected == 2
    tickets[0].release()
    tickets[0].release()  # idempotent
    async with admission.reserve():
        assert admission.statistics().running == 2
    tickets[1].release()
    assert admission.statistics() == type(admission.statistics())(0, 0, 2, 1, 2)


async def test_a_queued_request_runs_when_a_slot_frees() -> None:
    admission = Admission(max_concurrent=1, queue=1, retry_after_s=1, queue_timeout_s=5)
    first, second = admission.reserve(), admission.reserve()
    await first.__aenter__()
    async with trio.open_nursery() as nursery:
        ran = trio.Event()

        async def wait() -> None:
            async with second:
                ran.set()

        nursery.start_soon(wait)
        await trio.sleep(0.05)
        assert not ran.is_set()
        first.release()
        with trio.fail_after(1):
            await ran.wait()


def _receipt(step: int) -> object:
    x = torch.zeros(1, 1, 4)
    return make_receipt(Identity.from_seed(b"s"), "m", LayerRange(0, 2), b"s" * 16, step, x, x)


def test_receipt_store_forgets_by_count_and_age() -> None:
    now = [0.0]
    store = ReceiptStore(keep=2, ttl_s=10, clock=lambda: now[0])
    store.put("a", [_receipt(0)])  # type: ignore[list-item]
    store.put("b", [_receipt(1)])  # type: ignore[list-item]
    store.put("c", [_receipt(2)])  # type: ignore[list-item]
    assert store.get("a") is None and store.get("b") is not None and len(store) == 2
    now[0] = 10.5
    assert store.get("b") is None and len(store) == 0


def test_request_checks_name_the_field() -> None:
    facts = _facts()
    base = {"model": "m", "prompt": "The list", "max_tokens": 4}
    with pytest.raises(ApiError, match="does not exist") as e:
        completion_job(CompletionRequest(**{**base, "model": "other"}), facts)
    assert e.value.status == 404
    for extra, name in (
        ({"n": 3}, "n"),
        ({"logprobs": 2}, "logprobs"),
        ({"tools": [{}]}, "tools"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ):
        with pytest.raises(ApiError, match=name) as e:
            completion_job(CompletionRequest(**{**base, **extra}), facts)
        assert e.value.param == name
    neutral = completion_job(
        CompletionRequest(**{**base, "n": 1, "user": "u", "echo": False}), facts
    )
    assert neutral.max_new_tokens == 4
    with pytest.raises(ApiError, match="max_length") as e:
        completion_job(CompletionRequest(**{**base, "max_tokens": 64}), facts)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(ApiError, match="several prompts"):
        completion_job(CompletionRequest(**{**base, "prompt": ["a", "b"]}), facts)
    with pytest.raises(ApiError, match=r"\[0, 6144\)"):
        completion_job(CompletionRequest(**{**base, "prompt": [1, 99999]}), facts)
    default = completion_job(CompletionRequest(model="m", prompt="The list"), facts)
    assert default.max_new_tokens == 16 and default.verify == "none"
    assert default.speculative is None  # the gateway's --speculative
    guessed = {**base, "swarm": {"speculative": "ngram"}}
    assert completion_job(CompletionRequest(**guessed), facts).speculative == "ngram"
    with pytest.raises(ValidationError, match="speculative"):  # a request names no files
        CompletionRequest(**{**base, "swarm": {"speculative": "/etc/passwd"}})


def test_chat_needs_a_template() -> None:
    request = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}])  # type: ignore[list-item]
    with pytest.raises(ApiError, match="no chat template") as e:
        chat_job(request, _facts())
    assert e.value.status == 400 and e.value.code == "no_chat_template"
    template = ChatTemplate("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    job = chat_job(request.model_copy(update={"max_completion_tokens": 3}), _facts(template))
    assert job.max_new_tokens == 3 and job.kind == "chat" and job.id.startswith("chatcmpl-")
    with pytest.raises(ApiError, match="tool_calls"):
        chat_job(
            ChatRequest(
                model="m",
                messages=[
                    {
                        "role": "assistant",
                        "content": "x",  # type: ignore[list-item]
                        "tool_calls": [{}],
                    }
                ],
            ),
            _facts(template),
        )


def test_library_errors_map_to_http() -> None:
    assert error_from_exception(ConfigError("bad")).status == 400
    assert error_from_exception(RoutingError("none")).status == 503
    internal = error_from_exception(KeyError("secret detail"))
    assert internal.status == 500 and "secret" not in internal.message


def test_endpoint_labels_are_bounded() -> None:
    assert endpoint_label("/v1/chat/completions") == "/v1/chat/completions"
    assert endpoint_label("/v1/swarm/receipts/cmpl-123") == "/v1/swarm/receipts/*"
    assert endpoint_label("/wp-admin/x") == "other"


async def test_own_load_shows_this_clients_sessions_and_never_waits_long() -> None:
    from swarm.client.discovery import StaticDirectory
    from swarm.client.load import OwnLoad
    from swarm.directory import ServerView
    from swarm.types import PeerId

    a, b = (PeerId.from_public_key(Identity.from_seed(s).public_key) for s in (b"a", b"b"))
    views = [
        ServerView(a, "127.0.0.1:1", LayerRange(0, 2), 100.0, 1000, active_sessions=3),
        ServerView(b, "127.0.0.1:2", LayerRange(0, 2), 100.0, 1000),
    ]
    load = OwnLoad(StaticDirectory(views), wait_s=0.05)
    counted = load.add([a, b, b])
    seen = {v.peer_id: v.active_sessions for v in await load.directory.servers()}
    assert seen == {a: 3, b: 2}  # at least our own; the announcement may include them
    load.remove(counted)
    assert {v.peer_id: v.active_sessions for v in await load.directory.servers()} == {a: 3, b: 0}
    held, done = trio.Event(), trio.Event()

    async def stuck_opener() -> None:
        async with load.opening():
            held.set()
            await done.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stuck_opener)
        await held.wait()
        started = trio.current_time()
        with trio.fail_after(1):  # the next opener waits its turn, but not past wait_s
            async with load.opening():
                assert trio.current_time() - started >= 0.05
        done.set()
