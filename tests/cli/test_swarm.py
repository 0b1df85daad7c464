"""Real `swarm serve` processes without --identity on one machine make one swarm; a second
process with the identity of a live one refuses; `generate` names the `swarm serve` that
fills a missing block, and with --wait waits for it.

One swarm for the module: the first server starts without --initial-peers (its DHT node is
the swarm's bootstrap), two more join it; model B is served beside model A.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from swarm.lab.processes import ProcessGroup, SwarmProcess, swarm_command

from .conftest import NEW_TOKENS, PROMPT, error_lines, reference, run_cli, write_model

pytestmark = pytest.mark.slow

READY = r"ready: peer (\S+) at (\S+) .* dht (\S+)"
IDS = ",".join(map(str, PROMPT))


@dataclass
class Swarm:
    group: ProcessGroup
    dht: str
    servers: list[SwarmProcess]


@pytest.fixture(scope="module")
def swarm(model_a: Path, cli_env: dict[str, str]) -> Iterator[Swarm]:
    with ProcessGroup(env=cli_env) as group:
        first = group.start("s0", swarm_command("serve", str(model_a), "--layers", "0:2"))
        dht = first.wait_for_line(READY, 120).group(3)
        rest = [
            group.start(
                f"s{i}",
                swarm_command("serve", str(model_a), "--layers", layers, "--initial-peers", dht),
            )
            for i, layers in ((1, "2:4"), (2, "4:6"))
        ]
        for proc in rest:
            proc.wait_for_line(READY, 120)
        yield Swarm(group, dht, [first, *rest])


def test_servers_without_identity_make_one_swarm(
    swarm: Swarm, model_a: Path, cli_env: dict[str, str]
) -> None:
    peers = {p.wait_for_line(READY, 1).group(1) for p in swarm.servers}
    assert len(peers) == 3  # before: all three shared ~/.config/swarm/identity.key
    done = run_cli(
        "generate",
        str(model_a),
        "--ids",
        IDS,
        "--initial-peers",
        swarm.dht,
        "--max-new-tokens",
        str(NEW_TOKENS),
        "--json",
        env=cli_env,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["ids"] == reference(model_a)
    assert [(h["start"], h["stop"]) for h in result["route"]] == [(0, 2), (2, 4), (4, 6)]
    # the server started without --initial-peers said how others join it
    joined = f"--initial-peers {swarm.dht}"
    assert any(joined in line for line in swarm.servers[0].stderr_lines)


def test_same_identity_refused_gap_named_and_waited_for(
    swarm: Swarm, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    # model B: 16 positions, so PROMPT + NEW_TOKENS goes past them (a warning, not an error)
    model_b = write_model(tmp_path / "tiny-b", seed=5, positions=16)
    key = str(tmp_path / "shared.key")
    serve_b = ["serve", str(model_b), "--initial-peers", swarm.dht]
    live = swarm.group.start("b0", swarm_command(*serve_b, "--layers", "0:3", "--identity", key))
    address = live.wait_for_line(READY, 120).group(2)

    twin = swarm.group.start("twin", swarm_command(*serve_b, "--layers", "3:6", "--identity", key))
    assert twin.wait_exit(120) == 1, "a second server with a live server's identity started"
    lines = error_lines("\n".join(twin.stderr_lines))
    assert len(lines) <= 3 and "already served live" in lines[-1] and address in lines[-1]

    gap = run_cli("generate", str(model_b), "--ids", IDS, "--initial-peers", swarm.dht, env=cli_env)
    lines = error_lines(gap.stderr)
    assert gap.returncode == 1 and len(lines) <= 3
    assert re.search(rf"swarm serve \S+ --layers 3:6 --initial-peers {swarm.dht}", lines[-1])

    waiting = swarm.group.start(
        "wait",
        swarm_command(
            "generate",
            str(model_b),
            "--ids",
            IDS,
            "--initial-peers",
            swarm.dht,
            "--max-new-tokens",
            str(NEW_TOKENS),
            "--wait",
            "120",
            "--json",
        ),
    )
    filler = swarm.group.start(
        "b1", swarm_command(*serve_b, "--layers", "auto", "--num-blocks", "99")
    )
    filler.wait_for_line(READY, 120)
    assert waiting.wait_exit(120) == 0, waiting.stderr_lines
    assert json.loads(waiting.lines[-1])["ids"] == reference(model_b)
    assert any("past the model's 16 positions" in line for line in waiting.stderr_lines)
    assert any("--num-blocks 99 is more than the model's 6" in line for line in filler.stderr_lines)
    assert live.popen.poll() is None  # the refused twin did not disturb the live server

    # a crashed server's record stays "online" until it expires; its identity is free again
    # at once (its address refuses connections), and the new server's record replaces it
    peer = live.wait_for_line(READY, 1).group(1)
    live.kill()
    reborn = swarm.group.start("b2", swarm_command(*serve_b, "--layers", "0:3", "--identity", key))
    match = reborn.wait_for_line(READY, 120)
    assert match.group(1) == peer and match.group(2) != address
    status = run_cli("status", str(model_b), "--initial-peers", swarm.dht, env=cli_env)
    assert status.returncode == 0, status.stderr
    row = next(line for line in status.stdout.splitlines() if peer[:10] in line)
    assert match.group(2) in row and "online" in row
