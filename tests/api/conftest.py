"""Real swarms behind a real `swarm api` process, all on loopback (port 0 everywhere).

Every process is started through a `ProcessGroup` (one torch thread each, stopped by pid
when the module ends) and waited for with a deadline on its readiness line. The model is
the bundled 6 M-parameter `swarm-demo` (its chats use the gateway's simple template).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx2 as httpx
import pytest
import torch

from swarm.lab.liar import liar_command
from swarm.lab.processes import ProcessGroup, SwarmProcess, swarm_command
from swarm.shards.bundled import demo_model_path

torch.set_num_threads(1)

MODEL = demo_model_path()
MODEL_NAME = "swarm-demo"
API_KEY = "test-key-0123"
READY = r"ready: swarm api at (http://\S+) "


@dataclass
class ApiSwarm:
    """A DHT node, servers and a gateway; ``peers`` maps each server's peer id to its
    ``--layers`` and ``url`` is the gateway's base URL."""

    group: ProcessGroup
    home: Path
    dht: str
    url: str = ""
    gateway: SwarmProcess | None = None
    peers: dict[str, str] = field(default_factory=dict)
    servers: dict[str, SwarmProcess] = field(default_factory=dict)

    def client(self, key: str | None = API_KEY, timeout: float = 60.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def start_servers(self, specs: Sequence[tuple[str, str | None]]) -> list[str]:
        """Start one server per (layers, adversary) at once; returns their peer ids."""
        procs = []
        for layers, adversary in specs:
            args = [str(MODEL), "--layers", layers, "--initial-peers", self.dht]
            args += ["--announce-ttl", "10"]
            argv = liar_command(adversary, *args) if adversary else swarm_command("serve", *args)
            procs.append((layers, self.group.start(f"server-{layers}", argv)))
        peers = []
        for layers, proc in procs:
            peer = proc.wait_for_line(r"ready: peer (\S+) at", 120).group(1)
            self.peers[peer] = layers
            self.servers[peer] = proc
            peers.append(peer)
        return peers

    def start_gateway(self, *args: str) -> str:
        argv = swarm_command(
            "api",
            str(MODEL),
            "--initial-peers",
            self.dht,
            "--port",
            "0",
            "--reputation",
            str(self.home / "reputation.json"),
            *args,
        )
        self.gateway = self.group.start("gateway", argv)
        self.url = self.gateway.wait_for_line(READY, 120).group(1)
        return self.url


@pytest.fixture(scope="module")
def process_group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ProcessGroup, Path]]:
    home = tmp_path_factory.mktemp("home")
    with ProcessGroup(env={"HOME": str(home)}) as group:
        yield group, home


def start_dht(group: ProcessGroup, home: Path) -> ApiSwarm:
    _, dht = group.start_dht()
    return ApiSwarm(group, home, dht)


def swarm_generate(
    swarm: ApiSwarm, prompt: str | Sequence[int], max_new_tokens: int, *extra: str
) -> dict:
    """``swarm generate --json`` (temperature 0 unless ``extra`` says otherwise) for a text
    prompt or token ids."""
    request = ["--ids", ",".join(map(str, prompt))] if not isinstance(prompt, str) else [prompt]
    # --temperature 0 --top-k 0: generation_config.json's sampling overridden
    argv = swarm_command(
        "generate",
        str(MODEL),
        *request,
        "--initial-peers",
        swarm.dht,
        "--max-new-tokens",
        str(max_new_tokens),
        "--json",
        "--wait",
        "30",
        "--temperature",
        "0",
        "--top-k",
        "0",
        *extra,
    )
    proc = swarm.group.start("generate", argv)
    code = proc.wait_exit(120)
    assert code == 0, "\n".join(proc.stderr_lines[-20:])
    result: dict = json.loads(proc.lines[-1])
    return result


def sse_events(lines: Iterator[str]) -> Iterator[dict | str]:
    """The ``data:`` payloads of a server-sent event stream (JSON decoded, or "[DONE]")."""
    for line in lines:
        if not line.startswith("data: "):
            continue
        payload = line[len("data: ") :]
        yield payload if payload == "[DONE]" else json.loads(payload)


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    """``response`` is ``status`` with OpenAI's error body (and no traceback); its error."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert {"message", "type", "code"} <= set(error), error
    assert isinstance(error["message"], str) and error["message"]
    assert not re.search(r"Traceback|File \"", error["message"])
    if code is not None:
        assert error["code"] == code, error
    return dict(error)
