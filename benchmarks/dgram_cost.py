"""`internet.py` in one process, with the CPU it spent per DHT datagram (and a profile).

    python benchmarks/dgram_cost.py [--yappi N] -- --dht-nodes 300 --servers 30 --blocks 16 \\
        --span 4 --clients 6 --sybil-share 0.1 --junk-sybils 0.5 --churn-per-minute 2 \\
        --duration 60 --period 10 --ttl 20 --mass-leave-at 25 --mass-leave-gap

Runs `internet.py` with the flags after ``--`` (keep ``--processes 1``, the default: the
count and the CPU are this process's) and prints, after its JSON report, one ``COST`` line:
the process's CPU seconds (user + sys, every thread), the datagrams its DHT nodes received
and sent (counted on `SwarmProtocol`), and the CPU microseconds per datagram received.
``--yappi N`` profiles every thread (from ``--yappi-after`` seconds on) (the DHT's asyncio thread included) with yappi's CPU
clock and prints the N functions with the most own time and the N with the most time
inclusive (yappi is not a dependency: ``pip install yappi``; it slows the run about 2x,
so read its shares, not its seconds).
"""

from __future__ import annotations

import argparse
import resource
import runpy
import sys
import threading
import time
from pathlib import Path
from typing import Any

from swarm.dht import protocol

COUNTS = {"received": 0, "sent": 0}


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
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime
    received = COUNTS["received"]
    per = 1e6 * cpu / received if received else float("nan")
    print(
        f"COST cpu_s={cpu:.1f} wall_s={wall:.1f} received={received} sent={COUNTS['sent']}"
        f" cpu_us_per_received={per:.0f}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
