"""Children that exit when their parent dies: a lab process group's processes follow it.

A `ProcessGroup` made with ``die_with_parent=True`` names its own pid in each child's
environment (`PARENT_VARIABLE`); the child calls `exit_with_parent` first thing (``swarm``'s
entry point does). On Linux the kernel then sends the child SIGTERM when the parent dies
(``prctl(PR_SET_PDEATHSIG)``), however it dies (SIGKILL included); elsewhere a daemon thread
polls the parent's pid. SIGTERM is what ``swarm serve``, ``dht`` and ``api`` stop on cleanly.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

__all__ = ["PARENT_VARIABLE", "exit_with_parent"]

PARENT_VARIABLE = "SWARM_LAB_PARENT"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_POLL_S = 0.5


def exit_with_parent() -> None:
    """If this process was started by a lab group that asked for it, arrange to get SIGTERM
    when that parent dies; if it has died already, send it now. Does nothing otherwise."""
    raw = os.environ.get(PARENT_VARIABLE, "")
    if not raw.isdigit():
        return
    parent = int(raw)
    if not (sys.platform.startswith("linux") and _set_pdeathsig(signal.SIGTERM)):
        threading.Thread(target=_watch, args=(parent,), name="parent-watch", daemon=True).start()
    if os.getppid() != parent:  # it died before the kernel was told to watch it
        os.kill(os.getpid(), signal.SIGTERM)


def _set_pdeathsig(sig: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(_POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)
