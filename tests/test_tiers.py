"""The tier guard of tests/conftest.py: an unmarked test that starts a process or sleeps on
the wall clock fails (also when it happens in a thread that swallows the error); a marked
one, or one on trio's virtual clock, passes. Run in a pytest subprocess with a copy of the
conftest, so the cases cannot disturb this session."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs pytest in a subprocess

CASES = """
import subprocess
import sys
import threading
import time

import pytest
import trio
import trio.testing


def test_unmarked_process() -> None:
    subprocess.run([sys.executable, "-c", "pass"], check=True)


def test_unmarked_process_in_a_swallowing_thread() -> None:
    def start() -> None:
        try:
            subprocess.run([sys.executable, "-c", "pass"])
        except Exception:
            pass

    thread = threading.Thread(target=start)
    thread.start()
    thread.join()


async def test_unmarked_trio_process() -> None:
    await trio.run_process([sys.executable, "-c", "pass"])


def test_unmarked_wall_clock_sleep() -> None:
    time.sleep(0.3)


async def test_unmarked_trio_sleep() -> None:
    await trio.sleep(0.3)


async def test_virtual_clock_sleep(autojump_clock: trio.testing.MockClock) -> None:
    await trio.sleep(3600)


async def test_short_polls() -> None:
    for _ in range(3):
        await trio.sleep(0.01)


@pytest.mark.slow
def test_marked_process_and_sleep() -> None:
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    time.sleep(0.3)
"""


def test_the_guard_fails_unmarked_slow_tests(pytester: pytest.Pytester) -> None:
    conftest = Path(__file__).with_name("conftest.py").read_text()
    pytester.makeconftest(conftest)
    pytester.makeini("[pytest]\ntrio_mode = true\nmarkers =\n    slow: slow\n")
    pytester.makepyfile(test_cases=CASES)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=3, failed=5)
    failed = {line.split("::")[1].split()[0] for line in result.outlines
              if line.startswith("FAILED ")}  # fmt: skip
    assert failed == {
        "test_unmarked_process",
        "test_unmarked_process_in_a_swallowing_thread",
        "test_unmarked_trio_process",
        "test_unmarked_wall_clock_sleep",
        "test_unmarked_trio_sleep",
    }
    result.stdout.fnmatch_lines(["*started a process*but is not marked @pytest.mark.slow*"])
    result.stdout.fnmatch_lines(["*slept 0.3 s of wall clock (trio.sleep)*"])
