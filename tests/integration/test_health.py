"""`swarm status` and `swarm monitor` against real server processes, one of them lying."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from swarm.lab.processes import ProcessGroup, swarm_command

pytestmark = pytest.mark.slow


def test_status_and_monitor_find_the_liar(model12: Path, tmp_path: Path) -> None:
    with ProcessGroup() as group:
        _, dht = group.start_dht()
        honest = group.start_server(
            "a", str(model12), "0:6", dht, "--identity", str(tmp_path / "a")
        )
        liar = group.start_server(
            "b",
            str(model12),
            "6:12",
            dht,
            "--identity",
            str(tmp_path / "b"),
            liar="noise:0.05",
        )
        peer = {p.name: p.wait_for_line(r"peer (\S+)", 1).group(1)[:10] for p in (honest, liar)}
        common = ["--initial-peers", dht]
        status = subprocess.run(
            swarm_command("status", str(model12), *common, "--reputation", str(tmp_path / "r")),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert status.returncode == 0, status.stderr
        assert "0:12" in status.stdout and "2 servers" in status.stdout
        assert peer["a"] in status.stdout and peer["b"] in status.stdout
        monitor = subprocess.run(
            swarm_command("monitor", str(model12), *common, "--rounds", "2", "--interval", "0"),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert monitor.returncode == 0, monitor.stderr
        rows = {
            line.split("│")[1].strip(): line
            for line in monitor.stdout.splitlines()
            if line.count("│") > 3
        }
        assert "2/2 (100%)" in rows[peer["a"]]
        assert "0/2 (0%)" in rows[peer["b"]] and "WRONG" in rows[peer["b"]]
