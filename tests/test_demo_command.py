"""`swarm demo` runs a real local swarm end to end and leaves no process behind."""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from swarm.lab.processes import MARKER_VARIABLE, processes_marked, swarm_command

pytestmark = pytest.mark.slow


def test_demo_generates_and_stops_everything() -> None:
    # the demo and every process it starts inherit this marker; other `swarm` processes on
    # the machine (another test run, a user's server) do not have it
    marker = uuid.uuid4().hex
    done = subprocess.run(
        swarm_command("demo", "The list", "--max-new-tokens", "6", "--servers", "2"),
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, MARKER_VARIABLE: marker},
    )
    assert done.returncode == 0, done.stderr
    assert "route: client ->" in done.stdout
    assert "The list" in done.stdout
    assert "one process" in done.stdout and "swarm, 2 hops" in done.stdout
    assert "ready" in done.stderr  # start-up progress
    assert processes_marked(marker) == set()


def test_demo_liar_is_caught_under_verification() -> None:
    # spot-check:1.0 audits every hop at every step: the liar is caught either on the route
    # or as a checker (missed only if never picked among two checkers in 12 steps: 2^-12)
    done = subprocess.run(
        swarm_command(
            "demo",
            "The list",
            "--max-new-tokens",
            "12",
            "--servers",
            "2",
            "--verify",
            "spot-check:1.0",
            "--liar",
            "zeros",
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "(lying: zeros)" in done.stderr
    assert "(it was the zeros liar): banned" in done.stdout
