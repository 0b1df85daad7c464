"""`swarm key new FILE`, and `swarm --help` answering without importing torch or the network."""

from __future__ import annotations

import stat
import subprocess
import sys
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


# What made `swarm --help` slow (2.4 s where it now takes 0.3 s): importing the model, the
# event loop, the network stack. Their absence is the property; the seconds are not tested.
HEAVY = ("torch", "numpy", "transformers", "safetensors", "gguf", "trio", "kademlia")


def _imported(*argv: str) -> set[str]:
    """Top-level names of the modules the real `swarm ARGV` process imported (from
    ``python -X importtime``, which lists each on stderr)."""
    command = swarm_command(*argv)
    done = subprocess.run(
        [command[0], "-X", "importtime", *command[1:]], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    names = {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "typer" in names  # the listing was read
    return names


@pytest.mark.parametrize("argv", [("--help",), ("serve", "--help"), ("demo", "--help")])
def test_help_imports_nothing_heavy(argv: tuple[str, ...]) -> None:
    assert _imported(*argv) & set(HEAVY) == set()
