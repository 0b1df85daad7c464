"""Each ordinary mistake, through the real CLI: exit 1 and at most 3 lines on stderr that
name the problem (before: 97-251-line exception-group tracebacks).

All the mistakes run at once, as separate processes, so their start-up and the 10 s that an
unreachable DHT peer takes overlap.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from swarm.lab.processes import ProcessGroup, swarm_command

from .conftest import dead_udp_port, error_lines

pytestmark = pytest.mark.slow


def gpt2_folder(model: Path, where: Path) -> Path:
    """A copy of `model` whose config names an architecture swarm does not serve."""
    folder = where / "gpt2-like"
    shutil.copytree(model, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_every_mistake_is_one_line(
    model_a: Path,
    tmp_path: Path,
    cli_env: dict[str, str],
    busy_tcp_port: int,
    busy_udp_port: int,
) -> None:
    model, missing = str(model_a), str(tmp_path / "no-such-model")
    dead = f"127.0.0.1:{dead_udp_port()}"
    serve = ["serve", model, "--layers", "0:2"]
    # name -> (argv, what stderr must say)
    cases: dict[str, tuple[list[str], list[str]]] = {
        "no model folder": (["serve", missing, "--layers", "0:2"], [missing, "does not exist"]),
        "layers past the model": (["serve", model, "--layers", "0:99"], ["0:99", "6 layers"]),
        "layers backwards": (["serve", model, "--layers", "5:2"], ["START must be below STOP"]),
        "port in use": (
            [*serve, "--port", str(busy_tcp_port)],
            [f"127.0.0.1:{busy_tcp_port}", "already in use"],
        ),
        "dht port in use": (
            [*serve, "--dht-port", str(busy_udp_port)],
            [f"127.0.0.1:{busy_udp_port}", "already in use"],
        ),
        "unsupported architecture": (
            ["serve", str(gpt2_folder(model_a, tmp_path)), "--layers", "0:2"],
            ["GPT2LMHeadModel", "not supported"],
        ),
        "serve, unreachable peers": ([*serve, "--initial-peers", dead], [dead, "answered"]),
        "status, unreachable peers": (["status", model, "--initial-peers", dead], [dead]),
        "monitor, unreachable peers": (
            ["monitor", model, "--initial-peers", dead, "--rounds", "1"],
            [dead],
        ),
        "generate, unreachable peers": (
            ["generate", model, "--ids", "1,2", "--initial-peers", dead],
            [dead],
        ),
        "status, no model folder": (["status", missing, "--initial-peers", dead], [missing]),
    }
    if not torch.cuda.is_available():
        cases["cuda without CUDA"] = (
            [*serve, "--device", "cuda"],
            ["CUDA is not available", "--device cpu"],
        )
    with ProcessGroup(env=cli_env) as group:
        procs = {name: group.start(name, swarm_command(*argv)) for name, (argv, _) in cases.items()}
        verbose = group.start("verbose", swarm_command("--verbose", "serve", missing))
        for name, proc in procs.items():
            assert proc.wait_exit(120) == 1, (name, proc.stderr_lines)
        assert verbose.wait_exit(60) == 1
    for name, proc in procs.items():
        lines = error_lines("\n".join(proc.stderr_lines))
        assert len(lines) <= 3, (name, lines)
        assert lines[-1].startswith("error: "), (name, lines)
        for needle in cases[name][1]:
            assert needle in lines[-1], (name, needle, lines[-1])
    # --verbose adds the traceback; the last line is still the one-line error
    assert any("Traceback" in line for line in verbose.stderr_lines)
    assert verbose.stderr_lines[-1].startswith("error: ") and missing in verbose.stderr_lines[-1]
