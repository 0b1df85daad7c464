"""`swarm demo` checks its options before it starts any process (before: a bad --verify
policy was found after the DHT node and the servers had started)."""

from __future__ import annotations

import time

import pytest

from swarm.lab.processes import ProcessGroup, swarm_command

from .conftest import error_lines

pytestmark = pytest.mark.slow


def test_bad_demo_options_fail_before_any_process_starts(cli_env: dict[str, str]) -> None:
    cases = {"--verify": "bogus-policy", "--liar": "bogus-liar"}
    with ProcessGroup(env=cli_env) as group:
        demos = [
            group.start(opt, swarm_command("demo", opt, value)) for opt, value in cases.items()
        ]
        started: set[int] = set()
        deadline = time.monotonic() + 120
        while any(d.popen.poll() is None for d in demos) and time.monotonic() < deadline:
            started |= group.leftovers() - {d.pid for d in demos}
            time.sleep(0.05)
        codes = [d.wait_exit(10) for d in demos]
    assert started == set(), "the demo started processes before checking its options"
    for demo, value, code in zip(demos, cases.values(), codes, strict=True):
        lines = error_lines("\n".join(demo.stderr_lines))
        assert code == 1 and len(lines) <= 3 and value in lines[-1], (code, lines)
