"""The token loop has one implementation (`swarm.client.generation.TokenLoop`): no other
module of the client, the gateway or the CLI turns a chain's output into tokens."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOOP = ROOT / "swarm" / "client" / "generation.py"
# a token loop steps a chain and reads the head's logits (a self-check may do the latter)
PATTERNS = (re.compile(r"\.logits\("), re.compile(r"\bchain\.step\("))


def test_only_the_token_loop_samples_from_a_chain() -> None:
    found = []
    for folder in (ROOT / "swarm" / "client", ROOT / "swarm" / "api", ROOT / "cli"):
        for path in folder.rglob("*.py"):
            if path == LOOP:
                continue
            text = path.read_text()
            if all(p.search(text) for p in PATTERNS):
                found.append(str(path.relative_to(ROOT)))
    assert found == [], "a second token loop; use swarm.client.generation.TokenLoop"
    loop = LOOP.read_text()
    assert all(p.search(loop) for p in PATTERNS)
