"""`swarm key new FILE`, and `swarm --help` answering without importing torch."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from swarm.lab.processes import swarm_command
from swarm.net.swarm_key import load_swarm_key

from .conftest import error_lines, run_cli

pytestmark = pytest.mark.slow  # runs `swarm` processes


def test_key_new_writes_a_private_key_and_never_overwrites(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    path = tmp_path / "keys" / "swarm.key"
    done = run_cli("key", "new", str(path), env=cli_env)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = load_swarm_key(path)
    assert len(key) == 32 and str(path) in done.stdout and "--swarm-key" in done.stdout
    again = run_cli("key", "new", str(path), env=cli_env)
    lines = error_lines(again.stderr)
    assert again.returncode == 1 and len(lines) == 1 and "already exists" in lines[0]
    assert load_swarm_key(path) == key


def test_help_does_not_import_torch() -> None:
    code = "import sys, swarm_cli.main; print(sorted({'torch', 'trio'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_help_answers_fast() -> None:
    # 0.3 s on an idle 2-core machine (2.4 s when it imported torch); the bound leaves room
    # for a machine busy with other tests
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        done = subprocess.run(swarm_command("--help"), capture_output=True, env=env, timeout=30)
        best = min(best, time.perf_counter() - started)
        assert done.returncode == 0
    assert best < 1.0
