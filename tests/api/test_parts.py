"""The gateway's parts without a swarm: admission, the receipt store, request checking."""

from __future__ import annotations

import pytest
import torch
import trio
from pydantic import ValidationError

from swarm.api.admission import Admission
from swarm.api.errors import ApiError, error_from_exception
from swarm.api.jobs import ModelFacts, chat_job, check_request, completion_job
from swarm.api.middleware import endpoint_label, host_allowed
from swarm.api.receipts import ReceiptStore
from swarm.api.schemas import ChatRequest, CompletionRequest
from swarm.api.serve import is_public_bind
from swarm.client.sampling import SamplingConfig
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


async def test_a_less_busy_client_displaces_the_busiest_ones_queued_request() -> None:
    admission = Admission(max_concurrent=2, queue=2, retry_after_s=1, queue_timeout_s=5)
    flood = [admission.reserve(["host:a"]) for _ in range(4)]
    await flood[0].__aenter__()
    await flood[1].__aenter__()
    newcomer = admission.reserve(["host:b"])  # full, but host a holds 4 and b none
    assert admission.statistics().displaced == 1
    with pytest.raises(ApiError, match="less busy client") as refused:
        await flood[3].__aenter__()  # a's newest queued request made room
    assert refused.value.status == 429
    with pytest.raises(ApiError):
        admission.reserve(["host:a"])  # a cannot displace b (b holds fewer)
    order: list[str] = []

    async def run(ticket: object, name: str) -> None:
        async with ticket:  # type: ignore[attr-defined]
            order.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, flood[2], "a")
        await trio.sleep(0.01)
        nursery.start_soon(run, newcomer, "b")
        await trio.sleep(0.01)
        flood[0].release()  # one slot: b runs first although a queued earlier
        await trio.sleep(0.01)
        flood[1].release()
    assert order == ["b", "a"]
    assert admission.statistics().running == 0 and admission.statistics().queued == 0


async def test_one_client_alone_may_use_every_slot_and_the_queue() -> None:
    admission = Admission(max_concurrent=2, queue=2, retry_after_s=1, queue_timeout_s=5)
    mine = [admission.reserve(["host:a", "key:k"]) for _ in range(4)]
    with pytest.raises(ApiError):
        admission.reserve(["host:a", "key:k"])
    with pytest.raises(ApiError):  # the same key from another address shares the key's count
        admission.reserve(["host:z", "key:k"])
    other = admission.reserve(["host:z", "key:other"])  # another key and host gets in
    assert admission.statistics().displaced == 1
    for ticket in [*mine, other]:
        ticket.release()
    assert admission.statistics().queued == 0


def test_receipts_are_read_only_by_the_key_that_made_them() -> None:
    store = ReceiptStore(keep=4, ttl_s=10)
    store.put("a", [_receipt(0)], owner="k1")  # type: ignore[list-item]
    assert store.get("a", owner="k1") is not None
    assert store.get("a", owner="k2") is None and store.get("a") is None


def test_expensive_prompts_are_refused_before_tokenizing_and_policies_are_capped() -> None:
    facts = _facts()
    assert facts.max_prompt_chars == 2 * facts.token_chars * facts.max_length
    huge = CompletionRequest(model="m", prompt="a" * (facts.max_prompt_chars + 1))
    with pytest.raises(ApiError, match="cannot fit") as e:
        check_request(huge, facts)
    assert e.value.code == "context_length_exceeded"
    for policy, allowed in (("redundant:3", True), ("redundant:4", False), ("spot-check:1", True)):
        request = CompletionRequest(model="m", prompt="x", swarm={"verify": policy})  # type: ignore[arg-type]
        if allowed:
            check_request(request, facts)
        else:
            with pytest.raises(ApiError, match="at most 3") as e:
                check_request(request, facts)
            assert e.value.code == "policy_not_allowed"


@pytest.mark.parametrize(
    ("field", "value"),
    [("seed", 2**64), ("seed", -(2**63) - 1), ("prompt", "\ud800"), ("stop", ["a\udfff"])],
)
def test_bad_seeds_and_lone_surrogates_are_validation_errors(field: str, value: object) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        CompletionRequest(**{"model": "m", "prompt": "x", field: value})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="64 bits"):
        SamplingConfig(seed=2**64)


def test_host_check_refuses_names_a_rebinding_page_sends() -> None:
    allowed = frozenset({"gateway.lan"})
    for host in (b"127.0.0.1:8000", b"[::1]:8000", b"localhost:8000", b"10.1.2.3", b"gateway.lan"):
        assert host_allowed(host, allowed), host
    for host in (b"evil.example:8000", b"", b"127.0.0.1.evil.example", b"gateway.lan.evil.example"):
        assert not host_allowed(host, allowed), host
    assert is_public_bind("0.0.0.0") and is_public_bind("::") and is_public_bind("example.org")
    assert not is_public_bind("127.0.0.1") and not is_public_bind("localhost")


async def test_canaries_only_for_proven_records_a_few_ranges_a_round_one_layer_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from types import SimpleNamespace

    import swarm.verify.health as health
    from swarm.api.config import GatewayConfig
    from swarm.api.gateway import NEW_CANARY_RANGES, Gateway
    from swarm.directory import ServerView
    from swarm.errors import TransportError
    from swarm.types import PeerId

    loaded: list[LayerRange] = []
    real_load_span = health.load_span

    def counting_load_span(path: object, layers: LayerRange) -> object:
        loaded.append(layers)
        return real_load_span(path, layers)  # type: ignore[arg-type]

    monkeypatch.setattr(health, "load_span", counting_load_span)

    def peer(i: int) -> PeerId:
        return PeerId.from_public_key(Identity.from_seed(b"c%d" % i).public_key)

    forged = [ServerView(peer(i), f"10.0.0.9:{i}", LayerRange(0, i), 1.0, 10) for i in range(1, 7)]
    proven = [
        ServerView(peer(10 + i), f"10.0.0.{i}:1", LayerRange(i, 6), 1.0, 10) for i in range(4)
    ]

    async def no_connection(*args: object) -> object:
        raise TransportError("no server in this test")

    model = SimpleNamespace(
        path=MODEL,
        directory=SimpleNamespace(reached=lambda s: s in proven),
        pool=SimpleNamespace(get=no_connection),
        config=SimpleNamespace(request_timeout=1.0),
    )
    gateway = Gateway(model, GatewayConfig(), _facts())  # type: ignore[arg-type]
    gateway.servers = [*forged, *proven]
    await gateway.probe_servers()
    made = set(gateway._canaries.by_range)
    assert len(made) == NEW_CANARY_RANGES and made <= {s.layers for s in proven}
    await gateway.probe_servers()
    await gateway.probe_servers()
    assert set(gateway._canaries.by_range) == {s.layers for s in proven}  # never a forged range
    assert all(len(layers) == 1 for layers in loaded)  # memory: one layer at a time
    assert {p.peer_id for p in proven} == set(gateway._canaries.health)  # probed: only those
