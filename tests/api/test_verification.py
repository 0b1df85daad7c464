"""`swarm api` with a liar among the servers: ``/health`` is 503 naming the missing blocks
until servers cover the model, and a request asking ``"swarm": {"verify": "redundant:3"}``
gets the honest answer with the liar named in its ``swarm`` object's detections."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from swarm.client.sampling import SamplingConfig
from swarm.client.text import StopText
from swarm.shards import load_tokenizer
from swarm.testing.reference import generate_locally

from .conftest import MODEL, MODEL_NAME, ApiSwarm, start_dht

pytestmark = pytest.mark.slow

PROMPT = "The list"
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def empty_swarm(process_group: tuple) -> Iterator[ApiSwarm]:
    """A DHT node and a gateway, no servers yet (the tests below add them)."""
    group, home = process_group
    local = start_dht(group, home)
    local.start_gateway()
    yield local


def test_health_is_503_until_every_block_is_served(empty_swarm: ApiSwarm) -> None:
    with empty_swarm.client(key=None) as http:
        health = http.get("/health")
        assert health.status_code == 503
        assert health.json()["missing_blocks"] == [0, 1, 2, 3, 4, 5]
        empty_swarm.start_servers([("0:6", None), ("0:6", None), ("0:6", "noise:0.05")])
        deadline = time.monotonic() + 30  # the gateway looks again every 5 s
        while (health := http.get("/health")).status_code != 200:
            assert time.monotonic() < deadline, health.json()
            time.sleep(0.2)
        assert health.json()["missing_blocks"] == []


def _honest_text(ids: list[int]) -> str:
    tokenizer = load_tokenizer(MODEL)
    assert tokenizer is not None
    text = StopText(tokenizer)
    for token in ids:
        text.push(token)
    return text.text


def test_redundant_request_names_the_liar(empty_swarm: ApiSwarm) -> None:
    liar = next(peer for peer, proc in empty_swarm.servers.items()
                if "--testing-adversary" in proc.popen.args)  # type: ignore[operator]  # fmt: skip
    tokenizer = load_tokenizer(MODEL)
    assert tokenizer is not None
    ids = list(tokenizer.encode(PROMPT).ids)
    honest = generate_locally(MODEL, ids, NEW_TOKENS, SamplingConfig()).ids
    if 0 in honest:  # the swarm stops at EOS (id 0), the reference does not
        honest = honest[: honest.index(0) + 1]
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0,
            "swarm": {"verify": "redundant:3"}}  # fmt: skip
    with empty_swarm.client() as http:
        answer = http.post("/v1/completions", json=body).json()
    report = answer["swarm"]
    assert report["policy"] == "redundant:3"
    assert answer["choices"][0]["text"] == _honest_text(honest)
    assert answer["usage"]["completion_tokens"] == len(honest)
    assert liar in {d["peer"] for d in report["detections"]}, report
    assert report["audits"] > 0
    # the default policy of this gateway is none: nothing is checked, nothing detected
    with empty_swarm.client() as http:
        plain = http.post("/v1/completions", json={**body, "swarm": None}).json()
    assert plain["swarm"]["policy"] == "none" and plain["swarm"]["detections"] == []
    # ... but the proven liar is left out of its route, and the answer is the honest one
    assert liar not in {hop["peer"] for hop in plain["swarm"]["route"]}
    assert plain["choices"][0]["text"] == _honest_text(honest)
