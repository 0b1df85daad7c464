"""Real `swarm` processes for `swarm demo`, integration tests and benchmarks.

Each process is started with one torch thread, its stdout read line by line until its
readiness line appears (with a deadline), and stopped by its pid: SIGTERM first, SIGKILL
if it does not exit in time. `ProcessGroup` stops everything it started, also when the
caller fails: its processes share one OS process group (not the terminal's, so a Ctrl-C
reaches only the caller), which `stop_all` signals at once. With ``die_with_parent`` its
processes also exit when the caller dies without stopping them (SIGKILL included; see
`swarm.lab.parent`). Every process it starts carries the group's marker in its environment
(`MARKER_VARIABLE`), and so does everything those processes start in turn, so a test can
find what is left of its own processes (`processes_marked`) without counting anyone else's.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from swarm.lab.parent import PARENT_VARIABLE

__all__ = ["MARKER_VARIABLE", "ProcessGroup", "SwarmProcess", "processes_marked", "swarm_command"]

MARKER_VARIABLE = "SWARM_TEST_GROUP"


def swarm_command(*args: str) -> list[str]:
    """The argv that runs ``swarm <args>`` with this interpreter."""
    return [sys.executable, "-m", "swarm_cli.main", *args]


def processes_marked(marker: str) -> set[int]:
    """Pids of the live processes (other than this one) whose environment has
    ``MARKER_VARIABLE=marker``."""
    import psutil

    found = set()
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid == os.getpid() or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(MARKER_VARIABLE) == marker:
                found.add(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


@dataclass
class SwarmProcess:
    """A started process; `lines` collects its stdout, `stderr_lines` its stderr."""

    name: str
    popen: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    stderr_lines: list[str] = field(default_factory=list)
    _new_line: threading.Condition = field(default_factory=threading.Condition)
    _pumps: list[threading.Thread] = field(default_factory=list)
    _terminated: bool = False

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

    def wait_exit(self, timeout: float) -> int | None:
        """The exit code once the process exits (and all its output is in `lines` and
        `stderr_lines`), or None if it still runs after `timeout` s."""
        deadline = time.monotonic() + timeout
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        for pump in self._pumps:
            pump.join(max(0.1, deadline - time.monotonic()))
        return code

    def terminate(self) -> None:
        """SIGTERM, once (a second one would cut a server's drain short)."""
        if self.popen.poll() is None and not self._terminated:
            self._terminated = True
            self.popen.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, wait up to `timeout` s, then SIGKILL. Returns the exit code."""
        if self.popen.poll() is None:
            self.terminate()
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
    """Starts processes and stops all of them on exit (SIGTERM, then SIGKILL).

    ``env`` adds to (or overrides) the environment the processes inherit, e.g. a ``HOME``
    of the test's own. ``marker`` is put into every process's environment. With
    ``die_with_parent`` each process exits (SIGTERM) when this process dies.
    """

    def __init__(
        self,
        *,
        threads: int = 1,
        env: Mapping[str, str] | None = None,
        die_with_parent: bool = False,
    ) -> None:
        self.processes: list[SwarmProcess] = []
        self.pgid: int | None = None  # the OS process group of our processes
        # a group inside a marked process (e.g. `swarm demo` run by a test) keeps the mark,
        # so the test still finds the processes the demo starts
        self.marker = os.environ.get(MARKER_VARIABLE) or uuid.uuid4().hex
        self._env = {
            **os.environ,
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
            MARKER_VARIABLE: self.marker,
        }
        self._env.pop(PARENT_VARIABLE, None)  # a parent of ours is not our children's
        if die_with_parent:
            self._env[PARENT_VARIABLE] = str(os.getpid())

    def start(self, name: str, argv: Sequence[str]) -> SwarmProcess:
        try:
            popen = self._popen(argv, 0 if self.pgid is None else self.pgid)
        except PermissionError:  # every process of the group exited: the group is gone
            popen = self._popen(argv, 0)
        if self.pgid is None or popen.pid == _pgid_of(popen.pid):
            self.pgid = popen.pid
        proc = SwarmProcess(name, popen)
        for stream, into in ((popen.stdout, proc.lines), (popen.stderr, proc.stderr_lines)):
            pump = threading.Thread(target=proc._pump, args=(stream, into), daemon=True)
            pump.start()
            proc._pumps.append(pump)
        self.processes.append(proc)
        return proc

    def _popen(self, argv: Sequence[str], pgid: int) -> subprocess.Popen[str]:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,  # a background group reading a terminal would stop
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self._env,
            process_group=pgid,  # 0: a new group, led by this process
            preexec_fn=_interruptible,
        )

    def signal_all(self, sig: int) -> None:
        """Send ``sig`` to the group's OS process group (every process it started, and what
        they started), at once."""
        # only while a process of ours lives: then the group exists and its id is ours (a
        # group's id is not reused while it has members)
        if self.pgid is not None and any(p.popen.poll() is None for p in self.processes):
            try:
                os.killpg(self.pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass  # all exited

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
        liar: str | None = None,
    ) -> SwarmProcess:
        """A ``swarm serve`` process, once it printed its readiness line; with ``liar``, one
        that lies as that spec says (`swarm.lab.liar`)."""
        from swarm.lab.liar import liar_command  # torch and the server: only for a liar

        args = [model, "--layers", layers, "--initial-peers", dht_address, *extra]
        argv = liar_command(liar, *args) if liar else swarm_command("serve", *args)
        proc = self.start(name, argv)
        proc.wait_for_line(r"\bready\b", timeout)
        return proc

    def stop_all(self, timeout: float = 20.0) -> None:
        """SIGTERM to every process still running, at once (they drain in parallel), then
        wait for each; SIGKILL what has not exited after `timeout` s."""
        running = [proc for proc in reversed(self.processes) if proc.popen.poll() is None]
        self.signal_all(signal.SIGTERM)  # the whole group at once, what they started included
        for proc in running:
            proc._terminated = True  # one SIGTERM each: a second would cut a drain short
        for proc in running:
            proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in running:
            proc.stop(max(0.1, deadline - time.monotonic()))

    def leftovers(self) -> set[int]:
        """Pids of processes still alive that this group (or one of its processes) started."""
        return processes_marked(self.marker)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()


def _pgid_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _interruptible() -> None:
    """In the child before exec: SIGINT and SIGQUIT back to their defaults. A runner started
    in the background of a non-interactive shell (`nohup cmd &`) ignores both, children
    inherit that, and Python then installs no KeyboardInterrupt handler: a test's Ctrl-C
    would be ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)
