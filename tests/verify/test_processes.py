"""Real processes: a lab liar server (`zeros`) beside honest servers, and
`swarm generate --verify spot-check:0.5 --json` returns the honest tokens; the reputation file
written by one run bans the liar for the next."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from swarm.identity import Identity
from swarm.lab.processes import ProcessGroup, swarm_command
from swarm.verify.reputation import Reputation

from .conftest import NEW_TOKENS, PROMPT

pytestmark = pytest.mark.slow


def generate(model: Path, dht: str, reputation: Path) -> dict[str, object]:
    argv = swarm_command(
        "generate",
        str(model),
        "--ids",
        ",".join(map(str, PROMPT)),
        "--initial-peers",
        dht,
        "--max-new-tokens",
        str(NEW_TOKENS),
        "--json",
        "--verify",
        "spot-check:0.5",
        "--reputation",
        str(reputation),
    )
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_generate_with_verify_against_a_lying_process(
    model4: Path, reference: list[int], tmp_path: Path
) -> None:
    reputation = tmp_path / "reputation.json"
    with ProcessGroup() as group:
        _, dht = group.start_dht()
        liar_key = tmp_path / "liar.key"
        group.start_server(
            "liar",
            str(model4),
            "0:4",
            dht,
            "--identity",
            str(liar_key),
            liar="zeros",
        )
        for name in ("honest0", "honest1"):
            group.start_server(name, str(model4), "0:4", dht, "--identity", str(tmp_path / name))
        liar = Identity.load_or_create(liar_key).peer_id
        for _ in range(3):  # routes are random: the liar is on some of them
            result = generate(model4, dht, reputation)
            assert result["ids"] == reference
            assert all(hop["peer"] != str(liar) for hop in result["route"])  # type: ignore[attr-defined, index]
            if Reputation.load(reputation).is_banned(liar):
                break
        assert Reputation.load(reputation).is_banned(liar)
        again = generate(model4, dht, reputation)
        assert again["ids"] == reference and again["rollbacks"] == 0  # never routed to again
