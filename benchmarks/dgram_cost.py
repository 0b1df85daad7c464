"""`internet.py` in one process, with the CPU it spent per DHT datagram (and a profile).

    python benchmarks/dgram_cost.py [--yappi N] -- --dht-nodes 300 --servers 30 --blocks 16 \\
        --span 4 --clients 6 --sybil-share 0.1 --junk-sybils 0.5 --churn-per-minute 2 \\
        --duration 60 --period 10 --ttl 20 --mass-leave-at 25 --mass-leave-gap

Runs `internet.py` with the flags after ``--`` (keep ``--processes 1``, the default: the
count and the CPU are this process's) and prints, after its JSON report, one ``COST`` line:
the process's CPU seconds (user + sys, every thread), the datagrams its DHT nodes received
and sent (counted on `SwarmProtocol`), and the CPU microseconds per datagram received; then
the same over the run proper (``run:``, from the log line that the servers are up to the
end: no nodes opening, no imports).
``--yappi N`` profiles every thread (the DHT's asyncio thread included) from ``--yappi-after``
seconds on (yappi's overhead makes joins time out) with yappi's CPU clock, and prints the N
functions with the most own time and the N with the most time inclusive (yappi is not a
dependency: ``pip install yappi``; it slows the run several times, and pure-Python calls
most: read its shares as upper bounds for them).
"""

from __future__ import annotations

import argparse
import logging
import resource
import runpy
import sys
import threading
import time
from pathlib import Path
from typing import Any

from swarm.dht import protocol

COUNTS = {"received": 0, "sent": 0}
MARK: dict[str, float] = {}  # CPU and datagrams when the servers were up (the run's window)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _WindowStart(logging.Handler):
    """Marks the CPU and the datagrams counted when internet.py logs that its servers are up
    (what follows is the run proper: no more nodes opening, no imports)."""

    def emit(self, record: logging.LogRecord) -> None:
        if not MARK and "servers up" in record.getMessage():
            MARK.update(cpu=cpu_seconds(), received=COUNTS["received"], at=time.monotonic())


def count_datagrams() -> None:
    received = protocol.SwarmProtocol.datagram_received
    sendto = protocol._DatagramTransport.sendto

    def counted_received(self: Any, data: bytes, addr: Any) -> None:
        COUNTS["received"] += 1
        received(self, data, addr)

    def counted_sendto(self: Any, data: bytes, addr: Any = None) -> None:
        COUNTS["sent"] += 1
        sendto(self, data, addr)

    protocol.SwarmProtocol.datagram_received = counted_received  # type: ignore[method-assign]
    protocol._DatagramTransport.sendto = counted_sendto  # type: ignore[method-assign]


def print_profile(top: int) -> None:
    import yappi

    stats = yappi.get_func_stats()
    for column in ("tsub", "ttot"):
        stats.sort(column, "desc")
        print(f"PROFILE by {column}", file=sys.stderr)
        for row in list(stats)[:top]:
            where = f"{Path(row.module).name}:{row.lineno}"
            print(
                f"  {row.tsub:8.2f} {row.ttot:8.2f} {row.ncall:10d}  {row.name}  {where}",
                file=sys.stderr,
            )
    for thread in yappi.get_thread_stats():
        print(f"THREAD {thread.name} {thread.ttot:.2f}s", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--yappi", type=int, default=0, help="profile; print N rows")
    parser.add_argument(
        "--yappi-after", type=float, default=0.0,
        help="start the profile this many seconds in (yappi's overhead fails joins)",
    )  # fmt: skip
    args, rest = parser.parse_known_args()
    if rest and rest[0] == "--":
        rest = rest[1:]
    count_datagrams()
    logging.getLogger("swarm.testing.internet").addHandler(_WindowStart())
    if args.yappi:
        import yappi

        yappi.set_clock_type("cpu")
        start = threading.Timer(
            args.yappi_after, yappi.start, kwargs={"builtins": True, "profile_threads": True}
        )
        start.daemon = True
        start.start()
    started = time.monotonic()
    sys.argv = [str(Path(__file__).with_name("internet.py")), *rest]
    runpy.run_path(sys.argv[0], run_name="__main__")
    wall = time.monotonic() - started
    if args.yappi:
        import yappi

        yappi.stop()
        print_profile(args.yappi)
    cpu = cpu_seconds()
    received = COUNTS["received"]
    per = 1e6 * cpu / received if received else float("nan")
    run_cpu = cpu - MARK.get("cpu", 0.0)
    run_received = received - int(MARK.get("received", 0))
    run_per = 1e6 * run_cpu / run_received if run_received else float("nan")
    print(
        f"COST cpu_s={cpu:.1f} wall_s={wall:.1f} received={received} sent={COUNTS['sent']}"
        f" cpu_us_per_received={per:.0f} run: cpu_s={run_cpu:.1f}"
        f" wall_s={time.monotonic() - MARK.get('at', started):.1f} received={run_received}"
        f" cpu_us_per_received={run_per:.0f} swarm={Path(protocol.__file__).parents[2]}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
