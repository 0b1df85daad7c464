"""`swarm api` with a liar among the servers: ``/health`` is 503 naming the missing blocks
until servers cover the model, and a request asking ``"swarm": {"verify": "redundant:3"}``
gets the honest answer with the liar named in its ``swarm`` object's detections."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from swarm.client.sampling import SamplingConfig
from swarm.client.text import StopText
from swarm.lab.reference import generate_locally
from swarm.shards import load_tokenizer

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


def test_an_idle_connection_outlives_a_clients_pool_expiry(empty_swarm: ApiSwarm) -> None:
    """A connection idle past httpx's 5 s pool expiry is still open (the gateway's
    keep-alive is longer), so a client reusing it at that moment gets its answer; with
    Hypercorn's default 5 s, a request sent then met "Server disconnected"."""
    host, port = empty_swarm.url.removeprefix("http://").rsplit(":", 1)
    request = f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        for pause in (0.0, 6.0):
            time.sleep(pause)
            conn.sendall(request)
            assert _response_status(conn) == 503  # no servers yet: the body says which


def _response_status(conn: socket.socket) -> int:
    """The status of one HTTP/1.1 response read off ``conn`` (its body read whole)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        assert chunk, "the gateway closed the connection"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    length = next(
        int(v) for k, _, v in (x.partition(":") for x in lines[1:]) if k.lower() == "content-length"
    )
    while len(body) < length:
        chunk = conn.recv(4096)
        assert chunk, "the gateway closed the connection"
        body += chunk
    return int(lines[0].split()[1])


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
    liar = next(peer for peer, proc in empty_swarm.servers.items() if "--liar" in proc.popen.args)  # type: ignore[operator]
    tokenizer = load_tokenizer(MODEL)
    assert tokenizer is not None
    ids = list(tokenizer.encode(PROMPT).ids)
    honest = generate_locally(MODEL, ids, NEW_TOKENS, SamplingConfig()).ids
    if 0 in honest:  # the swarm stops at EOS (id 0), the reference does not
        honest = honest[: honest.index(0) + 1]
    body = {
        "model": MODEL_NAME,
        "prompt": PROMPT,
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
        "swarm": {"verify": "redundant:3"},
    }
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
