"""Shared test setup: one torch thread per process (2-core machines oversubscribe fast), and
the guard that keeps the test tiers true.

Two tiers (README, "Testing"): ``make test`` runs everything; ``make test-fast`` runs
``pytest -m "not slow"``, the tests that start no process and wait on no wall clock. A test
that starts a process (``subprocess``, ``trio.run_process``, `swarm.lab.processes`,
``os.fork`` ...) must be marked ``@pytest.mark.slow``, or the guard below fails it, also when
the process is started by a fixture it uses or from a worker thread. A test that sleeps in
real time is marked too, or better, runs its timers under trio's ``autojump_clock``: a single
real-clock sleep of `REAL_SLEEP_LIMIT` s or more, written in a test file of an unmarked
test, fails it the same way.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import atexit
import shutil
import tempfile

# The servers and tools a test runs keep identities, reputations and measured timings under
# HOME (~/.swarm, ~/.cache/swarm): a home of the run's own keeps them out of the user's, and
# keeps one run from starting on what an earlier run left there. Processes inherit it.
if "SWARM_TEST_HOME" not in os.environ:
    _home = tempfile.mkdtemp(prefix="swarm-test-home-")
    os.environ["SWARM_TEST_HOME"] = os.environ["HOME"] = _home
    atexit.register(shutil.rmtree, _home, ignore_errors=True)

import subprocess
import sys
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import pytest
import torch
import trio
import trio.testing

torch.set_num_threads(1)

pytest_plugins = ["pytester"]  # tests/test_tiers.py checks the guard below

SLOW = "slow"
REAL_SLEEP_LIMIT = 0.25
"""Seconds of one real-clock sleep that a test file of an unmarked test may ask for (short
polls of a condition, with a deadline around them, are fine; waiting out a timer is not)."""

TESTS = str(Path(__file__).resolve().parent) + os.sep


class UnmarkedSlowTest(Exception):
    """A test outside the slow tier started a process or slept in real time."""


_current: list[pytest.Item | None] = [None]
_violations: dict[str, list[str]] = {}


def _violation(what: str) -> None:
    """Record and raise, unless no test runs now or the running one is marked slow."""
    item = _current[0]
    if item is None or item.get_closest_marker(SLOW) is not None:
        return
    message = (
        f"{item.nodeid} {what} but is not marked @pytest.mark.{SLOW} "
        "(see tests/conftest.py: mark it, or use trio's autojump_clock for timers)"
    )
    _violations.setdefault(item.nodeid, []).append(message)
    raise UnmarkedSlowTest(message)


def _wrap(owner: Any, name: str, describe: Callable[..., str]) -> Callable[[], None]:
    """Patch ``owner.name`` to report a violation before it runs; returns the undo."""
    original = getattr(owner, name)

    def guarded(*args: Any, **kwargs: Any) -> Any:
        _violation(describe(*args, **kwargs))
        return original(*args, **kwargs)

    setattr(owner, name, guarded)
    return lambda: setattr(owner, name, original)


def _argv(args: Any) -> str:
    if isinstance(args, str | bytes | os.PathLike):
        return repr(os.fsdecode(args))
    return repr([os.fsdecode(a) for a in args][:4])


def _called_from_a_test_file(depth: int) -> bool:
    frame = sys._getframe(depth)  # the caller of the patched function
    return frame.f_code.co_filename.startswith(TESTS) and not frame.f_code.co_filename.endswith(
        "conftest.py"
    )


def _install_guard() -> list[Callable[[], None]]:
    undo = [
        # every subprocess: subprocess.run/Popen, trio.run_process, asyncio, os.popen
        _wrap(
            subprocess.Popen,
            "_execute_child",
            lambda self, args, *a, **k: f"started a process {_argv(args)}",
        ),
        _wrap(os, "system", lambda command: f"started a process {command!r}"),
    ]
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp"):
        if hasattr(os, name):
            undo.append(_wrap(os, name, lambda *a, _n=name, **k: f"called os.{_n}"))

    real_time_sleep = time.sleep
    real_trio_sleep = trio.sleep

    def time_sleep(seconds: float) -> None:
        if seconds >= REAL_SLEEP_LIMIT and _called_from_a_test_file(2):
            _violation(f"slept {seconds:g} s of wall clock (time.sleep)")
        real_time_sleep(seconds)

    async def trio_sleep(seconds: float) -> None:
        if (
            seconds >= REAL_SLEEP_LIMIT
            and _called_from_a_test_file(2)
            and not isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock)
        ):
            _violation(f"slept {seconds:g} s of wall clock (trio.sleep)")
        await real_trio_sleep(seconds)

    time.sleep = time_sleep
    trio.sleep = trio_sleep
    undo.append(lambda: setattr(time, "sleep", real_time_sleep))
    undo.append(lambda: setattr(trio, "sleep", real_trio_sleep))
    return undo


_undo: list[Callable[[], None]] = []


def pytest_configure(config: pytest.Config) -> None:
    _undo.extend(_install_guard())


def pytest_unconfigure(config: pytest.Config) -> None:
    while _undo:
        _undo.pop()()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None]:
    _current[0] = item
    try:
        return (yield)
    finally:
        _current[0] = None


def _fail_if_violated(item: pytest.Item) -> None:
    """A violation swallowed on the way (in a thread, a broad except) still fails the test."""
    if messages := _violations.pop(item.nodeid, None):
        raise UnmarkedSlowTest(messages[0])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None]:
    result = yield
    _fail_if_violated(item)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None]:
    result = yield
    _fail_if_violated(item)
    return result


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Tests skipped with a reason starting "NOT RUN" (the browser test without chromium)
    get a section of their own at the end, so a skip that matters is not one among many."""
    not_run = [
        report
        for report in terminalreporter.stats.get("skipped", [])
        if "NOT RUN" in str(report.longrepr)
    ]
    if not_run:
        terminalreporter.section("NOT RUN", sep="!", red=True, bold=True)
        for report in not_run:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
            terminalreporter.line(f"NOT RUN {report.nodeid}: {reason}", red=True)
