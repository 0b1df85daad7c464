"""`internet.py` with a phase trace of every rebalancer: where a gap move's seconds go.

    python benchmarks/heal_trace.py --dht-nodes 100 --servers 16 --blocks 8 --span 2 \\
        --clients 4 --sybil-share 0.1 --junk-sybils 0.5 --churn-per-minute 2 --duration 90 \\
        --period 5 --ttl 10 --mass-leave-at 15 --mass-leave-gap --processes 2 --seed 0 \\
        > report.json 2> trace.txt

Takes `internet.py`'s flags and prints its JSON report; on stderr one ``TRACE`` line per
phase: seconds since start, the server (its `PeerId`, shortened), and what it did: each
read of the block keys and its duration, each check's decision (``confirm``: the check after
the intent), each intent announced or withdrawn (``intend None``) and how long announcing it
took, each move's start and end, the turns of the loop (``early=True``: the watch found a
gap), and the mass departure. The rebalancer is wrapped from outside (its ``read``,
``intend`` and ``move`` callables and its checks), so the code measured is the code shipped.
"""

from __future__ import annotations

import logging
import runpy
import sys
import time
from pathlib import Path
from typing import Any

from swarm.server import rebalancer

T0 = time.monotonic()


def trace(me: object, what: str) -> None:
    print(f"TRACE {time.monotonic() - T0:8.2f} {str(me)[:8]} {what}", file=sys.stderr, flush=True)


def timed(me: object, name: str, fn: Any) -> Any:
    async def call(*args: Any) -> Any:
        started = time.monotonic()
        if name == "move":
            trace(me, f"move start {args[0].describe()}")
        result = await fn(*args)
        seconds = time.monotonic() - started
        if name == "read":
            trace(me, f"read {len(result)} views {seconds:.2f}s")
        elif name == "intend":
            trace(me, f"intend {args[0]} {seconds:.2f}s")
        else:
            trace(me, f"move done {seconds:.2f}s")
        return result

    return call


class TracedRebalancer(rebalancer.Rebalancer):
    def __init__(self, config: Any, me: Any, num_layers: int, **kw: Any) -> None:
        for name in ("read", "intend", "move"):
            kw[name] = timed(me, name, kw[name])
        super().__init__(config, me, num_layers, **kw)

    async def check(self, **kw: Any) -> Any:
        decision = await super().check(**kw)
        confirming = " confirm" if kw.get("confirming") else ""
        trace(self.me, f"check{confirming}: {decision.describe() if decision else None}")
        return decision

    async def step(self, **kw: Any) -> Any:
        trace(self.me, f"turn early={bool(kw.get('early'))}")
        return await super().step(**kw)


class Departure(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if "mass departure" in record.getMessage():
            trace("--------", record.getMessage())


def main() -> None:
    import swarm.testing.internet as internet

    internet.Rebalancer = TracedRebalancer  # type: ignore[misc]
    logging.getLogger("swarm.testing.internet").addHandler(Departure())
    sys.argv = ["internet.py", *sys.argv[1:]]
    runpy.run_path(str(Path(__file__).with_name("internet.py")), run_name="__main__")


if __name__ == "__main__":
    main()
