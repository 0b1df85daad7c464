"""Ctrl-C: `swarm serve` stops at once during start-up (before: it went on until it was
ready, 28 s later on a real model); `swarm demo` interrupted exits non-zero and leaves no
process behind."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import pytest

from swarm.lab.processes import ProcessGroup, SwarmProcess, swarm_command

pytestmark = pytest.mark.slow


def wait_until(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def has_udp_socket(proc: SwarmProcess) -> bool:
    try:
        return bool(psutil.Process(proc.pid).net_connections(kind="udp"))
    except psutil.NoSuchProcess:
        return True  # exited: let the caller's exit check say how


def test_ctrl_c_stops_serve_start_up_at_once(
    model_a: Path, cli_env: dict[str, str], busy_udp_port: int
) -> None:
    # Two initial peers: a live DHT node, and one that never answers (a bound socket nobody
    # reads, so no ICMP refusal either): the DHT join waits for the silent one for about 2 s,
    # a window in which the server has its DHT socket open and is far from ready. Before, the
    # server went on to load, announce and report ready, and only then stopped (exit 0).
    silent = f"127.0.0.1:{busy_udp_port}"
    with ProcessGroup(env=cli_env) as group:
        _, dht = group.start_dht()
        proc = group.start(
            "serve",
            swarm_command(
                "serve",
                str(model_a),
                "--layers",
                "0:2",
                "--initial-peers",
                silent,
                "--initial-peers",
                dht,
            ),
        )
        wait_until(lambda: has_udp_socket(proc), 60, "the server never opened its DHT socket")
        time.sleep(0.3)  # well inside the join
        proc.popen.send_signal(signal.SIGINT)
        code = proc.wait_exit(10)  # a deadline against hanging, not a speed bound
    assert code == 130, (code, proc.lines, proc.stderr_lines)
    assert not proc.lines, "the server went on to report ready"
    # it stopped inside the join: the next stage, loading the layers, never began
    loading = [line for line in proc.stderr_lines if line.startswith("loading layers")]
    assert not loading, proc.stderr_lines
    assert proc.stderr_lines[-1] == "interrupted", proc.stderr_lines


def test_interrupted_demo_exits_non_zero_and_stops_its_processes(cli_env: dict[str, str]) -> None:
    with ProcessGroup(env=cli_env) as group:
        demo = group.start("demo", swarm_command("demo", "--max-new-tokens", "4", "--servers", "2"))
        # wait until the demo has started a child of its own (its DHT node)
        started = lambda: demo.popen.poll() is not None or len(group.leftovers()) >= 2  # noqa: E731
        wait_until(started, 120, "the demo started no process")
        assert demo.popen.poll() is None, demo.stderr_lines
        demo.popen.send_signal(signal.SIGINT)
        code = demo.wait_exit(60)
        assert code not in (None, 0), (code, demo.stderr_lines)
        assert group.leftovers() == set()
