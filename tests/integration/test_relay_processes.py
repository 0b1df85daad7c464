"""Real processes: `swarm dht` (a relay) and three servers, the middle one announcing an
address where nothing listens; it finds itself unreachable, joins through relays, and
`swarm generate` gives the single-process tokens through it, pushes in and out, relayed
with ``--no-direct`` and over a direct connection made through the relay by default."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from swarm.testing.processes import ProcessGroup, swarm_command

from .conftest import NEW_TOKENS, PROMPT

pytestmark = pytest.mark.slow


def test_swarm_generate_through_a_relayed_middle_server(
    model12: Path, reference: list[int], tmp_path: Path
) -> None:
    with ProcessGroup() as group:
        _, dht = group.start_dht()
        first = group.start_server("s0", str(model12), "0:4", dht)
        # listens on 127.0.0.1, announces 127.0.0.9: nothing listens where others dial
        middle = group.start_server("s1", str(model12), "4:8", dht, "--public-addr", "127.0.0.9")
        last = group.start_server("s2", str(model12), "8:12", dht)
        ready = {
            p.name: next(line for line in p.lines if "ready" in line)
            for p in group.processes
            if p.name != "dht"
        }
        assert "reachability reachable" in ready["s0"] and "reachability reachable" in ready["s2"]
        assert "reachability unreachable relays " in ready["s1"], ready["s1"]
        argv = swarm_command(
            "generate", str(model12), "--ids", ",".join(map(str, PROMPT)),
            "--initial-peers", dht, "--max-new-tokens", str(NEW_TOKENS), "--json",
        )  # fmt: skip
        done = subprocess.run([*argv, "--no-direct"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert result["ids"] == reference
        assert [hop["path"] for hop in result["route"]] == ["direct", "relayed", "direct"]
        assert result["route"][1]["host"] == "127.0.0.1"  # a relay's address, not 127.0.0.9
        # by default the client upgrades its channel to the relayed server (loopback)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert result["ids"] == reference
        paths = [(hop["path"], hop["upgraded"]) for hop in result["route"]]
        assert paths == [("direct", False), ("direct", True), ("direct", False)]
        status = subprocess.run(
            swarm_command("status", str(model12), "--initial-peers", dht),
            capture_output=True, text=True, timeout=120,
            env={**os.environ, "COLUMNS": "300"},  # a table wide enough not to cut words
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
        assert "relayed" in status.stdout and "unreachable" in status.stdout
        assert all(p.stop() == 0 for p in (first, middle, last))
