"""A SIGKILLed `swarm demo` (and `swarm demo --api`) takes its processes with it: they exit
when their parent dies (`swarm.lab.parent`), checked by the pids the demo started."""

from __future__ import annotations

import time

import psutil
import pytest

from swarm.lab.processes import ProcessGroup, SwarmProcess, swarm_command

pytestmark = pytest.mark.slow

DEMO = ("demo", "--model", "swarm-demo", "--servers", "2", "--max-new-tokens", "64")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _children(demo: SwarmProcess, at_least: int, timeout: float) -> set[int]:
    """The pids the demo started, once it started ``at_least`` of them (deadline)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert demo.popen.poll() is None, demo.stderr_lines[-20:]
        pids = {p.pid for p in psutil.Process(demo.pid).children()}
        if len(pids) >= at_least:
            return pids
        time.sleep(0.1)
    raise TimeoutError(f"the demo started fewer than {at_least} processes in {timeout} s")


def _kill_and_check(group: ProcessGroup, demo: SwarmProcess, children: set[int]) -> None:
    demo.kill()  # SIGKILL: the demo runs no cleanup of its own
    deadline = time.monotonic() + 60
    while {pid for pid in children if _alive(pid)} and time.monotonic() < deadline:
        time.sleep(0.2)
    left = {pid for pid in children if _alive(pid)}
    assert left == set(), f"still running 60 s after the demo was killed: {left}"
    assert group.leftovers() == set()


def test_a_killed_demo_leaves_no_process(cli_env: dict[str, str]) -> None:
    with ProcessGroup(env=cli_env) as group:
        demo = group.start("demo", swarm_command(*DEMO))
        children = _children(demo, 3, 180)  # the DHT node and both servers
        _kill_and_check(group, demo, children)


def test_a_killed_demo_api_leaves_no_process(cli_env: dict[str, str]) -> None:
    with ProcessGroup(env=cli_env) as group:
        demo = group.start("demo", swarm_command(*DEMO, "--api", "--api-port", "0"))
        demo.wait_for_line(r"OpenAI API at http", 240)
        children = _children(demo, 4, 10)  # the DHT node, both servers and the gateway
        _kill_and_check(group, demo, children)
