"""Helpers for tests that run the real `swarm` command in subprocesses.

Every process gets its own ``HOME`` (so nothing reads or writes the user's
``~/.config/swarm``), one torch thread, loopback addresses and ports picked by the OS.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from swarm.lab.processes import swarm_command
from swarm.lab.reference import generate_locally
from swarm.testing.checkpoints import write_random_llama

PROMPT = [5, 17, 30, 99, 42, 7]
NEW_TOKENS = 12
EOS = 127  # the fixtures check that greedy generation does not reach it


def write_model(path: Path, seed: int, positions: int = 2048) -> Path:
    """A random 6-layer Llama whose greedy continuation of PROMPT has NEW_TOKENS tokens."""
    write_random_llama(path, num_layers=6, hidden=64, vocab=128, seed=seed)
    config = json.loads((path / "config.json").read_text())
    config.update(eos_token_id=EOS, max_position_embeddings=positions)
    (path / "config.json").write_text(json.dumps(config))
    return path


def reference(path: Path) -> list[int]:
    ids = generate_locally(path, PROMPT, NEW_TOKENS).ids
    assert EOS not in ids, "pick another seed: the reference reaches EOS"
    return ids


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment additions for `swarm` subprocesses: a HOME of their own."""
    return {"HOME": str(tmp_path_factory.mktemp("home"))}


@pytest.fixture(scope="session")
def model_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("a") / "tiny-a", seed=3)


def run_cli(
    *args: str, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``swarm ARGS`` to completion (killed after `timeout` s)."""
    return subprocess.run(
        swarm_command(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **env},
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.fixture
def busy_tcp_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def busy_udp_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def dead_udp_port() -> int:
    """A loopback UDP port nobody listens on (bound by the OS, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
