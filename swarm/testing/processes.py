"""Real `swarm` processes for integration tests, benchmarks and `swarm demo`.

Each process is started with one torch thread, its stdout read line by line until its
readiness line appears (with a deadline), and stopped by its pid: SIGTERM first, SIGKILL
if it does not exit in time. `ProcessGroup` stops everything it started, also when the
caller fails.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType

__all__ = ["ProcessGroup", "SwarmProcess", "swarm_command"]


def swarm_command(*args: str) -> list[str]:
    """The argv that runs ``swarm <args>`` with this interpreter."""
    return [sys.executable, "-m", "swarm_cli.main", *args]


@dataclass
class SwarmProcess:
    """A started process; `lines` collects its stdout, `stderr_lines` its stderr."""

    name: str
    popen: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    stderr_lines: list[str] = field(default_factory=list)
    _new_line: threading.Condition = field(default_factory=threading.Condition)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _pump(self, stream: object, into: list[str]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            with self._new_line:
                into.append(line.rstrip("\n"))
                self._new_line.notify_all()
        with self._new_line:
            self._new_line.notify_all()

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first stdout line matching `pattern`; raises `TimeoutError` (with the
        process's stderr) after `timeout` s or `RuntimeError` if the process exits first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._new_line:
            while True:
                for line in self.lines[seen:]:
                    if match := regex.search(line):
                        return match
                seen = len(self.lines)
                if self.popen.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited with {self.popen.returncode} before printing "
                        f"{pattern!r}; stderr:\n" + "\n".join(self.stderr_lines[-30:])
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"{self.name} did not print {pattern!r} within {timeout} s; stderr:\n"
                        + "\n".join(self.stderr_lines[-30:])
                    )
                self._new_line.wait(min(left, 0.5))

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, wait up to `timeout` s, then SIGKILL. Returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL now, as a crash would."""
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)


class ProcessGroup:
    """Starts processes and stops all of them on exit (SIGTERM, then SIGKILL)."""

    def __init__(self, *, threads: int = 1) -> None:
        self.processes: list[SwarmProcess] = []
        self._env = {
            **os.environ,
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }

    def start(self, name: str, argv: Sequence[str]) -> SwarmProcess:
        popen = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self._env,
            start_new_session=True,
        )
        proc = SwarmProcess(name, popen)
        for stream, into in ((popen.stdout, proc.lines), (popen.stderr, proc.stderr_lines)):
            threading.Thread(target=proc._pump, args=(stream, into), daemon=True).start()
        self.processes.append(proc)
        return proc

    def start_dht(self, *extra: str, timeout: float = 60.0) -> tuple[SwarmProcess, str]:
        """A ``swarm dht`` process and its ``host:port``."""
        proc = self.start("dht", swarm_command("dht", *extra))
        match = proc.wait_for_line(r"listening on (\S+:\d+)", timeout)
        return proc, match.group(1)

    def start_server(
        self,
        name: str,
        model: str,
        layers: str,
        dht_address: str,
        *extra: str,
        timeout: float = 120.0,
    ) -> SwarmProcess:
        """A ``swarm serve`` process, once it printed its readiness line."""
        argv = swarm_command(
            "serve", model, "--layers", layers, "--initial-peers", dht_address, *extra
        )
        proc = self.start(name, argv)
        proc.wait_for_line(r"\bready\b", timeout)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()
