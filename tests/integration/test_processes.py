"""Real `swarm` processes: a DHT node and three servers; `swarm generate` and `RemoteModel`
produce exactly the single-process tokens; a SIGKILLed server is recovered from."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import aclosing
from pathlib import Path

import pytest
import trio

from swarm.client.config import ClientConfig
from swarm.client.model import AsyncRemoteModel
from swarm.client.remote import RemoteModel
from swarm.testing.processes import ProcessGroup, swarm_command

from .conftest import NEW_TOKENS, PROMPT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chain(model12: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`swarm dht` + servers [0,4) [4,8) [8,12); yields the DHT address."""
    keys = tmp_path_factory.mktemp("keys")
    with ProcessGroup() as group:
        _, dht = group.start_dht()
        for i, layers in enumerate(["0:4", "4:8", "8:12"]):
            group.start_server(
                f"server{i}", str(model12), layers, dht, "--identity", str(keys / f"id{i}")
            )
        yield dht
        # every process exits cleanly on SIGTERM
        assert [proc.stop() for proc in group.processes] == [0, 0, 0, 0]


def test_generate_cli_json_equals_single_process(
    chain: str, model12: Path, reference: list[int]
) -> None:
    ids = ",".join(map(str, PROMPT))
    argv = swarm_command(
        "generate",
        str(model12),
        "--ids",
        ids,
        "--initial-peers",
        chain,
        "--max-new-tokens",
        str(NEW_TOKENS),
        "--json",
    )
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["ids"] == reference
    assert [(hop["start"], hop["stop"]) for hop in result["route"]] == [(0, 4), (4, 8), (8, 12)]
    assert len(result["timings"]) == NEW_TOKENS
    assert "text" not in result  # this checkpoint has no tokenizer


def test_remote_model_equals_single_process(
    chain: str, model12: Path, reference: list[int]
) -> None:
    with RemoteModel.from_pretrained(model12, initial_peers=[chain]) as model:
        assert model.generate(PROMPT, max_new_tokens=NEW_TOKENS) == reference
        streamed = list(model.stream(PROMPT, max_new_tokens=NEW_TOKENS))
    assert streamed == reference


async def test_sigkill_on_the_route_mid_generation(
    model12: Path, reference: list[int], tmp_path: Path
) -> None:
    with ProcessGroup() as group:
        _, dht = group.start_dht()
        servers = {
            name: group.start_server(
                name, str(model12), layers, dht, "--identity", str(tmp_path / name)
            )
            for name, layers in [("a", "0:6"), ("b", "6:12"), ("c", "6:12")]
        }
        config = ClientConfig(initial_peers=(dht,), step_timeout=10.0)
        got: list[int] = []
        with trio.fail_after(120):
            async with AsyncRemoteModel.open(model12, config) as model:
                async with aclosing(model.stream(PROMPT, NEW_TOKENS)) as tokens:
                    async for token in tokens:
                        got.append(token.id)
                        if len(got) == 5:
                            victim_port = tokens.result.route[-1]["port"]
                            victim = next(
                                p
                                for n, p in servers.items()
                                if n != "a" and f":{victim_port} " in p.lines[-1]
                            )
                            victim.kill()
                assert tokens.result.recoveries >= 1
        assert got == reference
