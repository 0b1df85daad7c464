"""Warnings and logs go to stderr on a line of their own, never inside streamed text.

Before: `to representpeer F4ov… lied on layers 4:6` (a warning written in the middle of a
streamed line). Each case runs in a subprocess, so stdout and stderr are real files.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # each case runs in a subprocess

# writes half a line to stdout, logs a warning mid-line, then finishes the line
STREAM = """
import logging, sys
from swarm_cli.output import setup_logging
setup_logging()
sys.stdout.write("to represent"); sys.stdout.flush()
logging.getLogger("swarm.verify").warning("peer F4ov lied on layers 4:6")
sys.stdout.write(" the data\\n")
"""


def test_warning_mid_stream_lands_on_its_own_line_in_a_shared_terminal() -> None:
    done = subprocess.run(
        [sys.executable, "-c", STREAM],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # one destination, as a terminal or `2>&1` is
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.splitlines() == [
        "to represent",
        "warning: peer F4ov lied on layers 4:6",
        " the data",
    ]


def test_warning_never_enters_piped_stdout() -> None:
    done = subprocess.run(
        [sys.executable, "-c", STREAM], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout == "to represent the data\n"  # the text, untouched
    assert done.stderr == "warning: peer F4ov lied on layers 4:6\n"
