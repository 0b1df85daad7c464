"""The internet simulation split across processes: worker processes that host DHT nodes.

One Python process with one DHT thread cannot keep a thousand nodes answering (every reply
verifies Ed25519 signatures on that thread). With ``SimConfig.processes = N``, the
coordinator (the process that runs `swarm.testing.internet.run_simulation`, with the
servers, clients, churn and figures) hosts one share of the DHT nodes and starts N - 1
workers (``python -m swarm.testing.internet_workers``), each hosting another share in its
own `swarm.testing.internet_plane.DHTSlice`: its own DHT thread, its own link emulator
(delaying what its nodes send, so that every datagram crosses one emulated link), its own
sybils. Workers join through the coordinator's first node.

The coordinator talks to a worker over its stdin and stdout, one line each way:
the worker prints ``ready`` once its nodes have joined; ``go`` starts its counts;
``stop`` (or the end of its stdin) makes it print its `SliceStatistics` as JSON, close its
nodes and exit. Every wait has a deadline; a worker that misses one is killed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from subprocess import PIPE
from typing import Any

import trio

from swarm.errors import SwarmError
from swarm.testing.internet_plane import DHTSlice, SliceStatistics

__all__ = ["Worker", "WorkerSpec", "open_workers"]

READY_TIMEOUT_PER_NODE = 2.0  # seconds a worker may take per node it opens (a loaded machine)
STOP_TIMEOUT = 60.0


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """What one worker hosts: ``nodes`` DHT nodes, ``sybils`` of them sybils (``junk`` of
    those answering junk), joining through ``bootstrap``; the rest is the swarm's config."""

    name: str
    nodes: int
    sybils: int
    junk: float
    bootstrap: str
    seed: int
    intra: tuple[float, float]
    inter: tuple[float, float]
    loss: float
    ttl: float
    blocks: int
    verified_cache: int


class _Lines:
    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""

    async def line(self) -> str:
        while b"\n" not in self._buffer:
            chunk = await self._stream.receive_some(65536)
            if not chunk:
                raise SwarmError("a simulation worker closed its output")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()


class Worker:
    """A started worker process (see the module docstring)."""

    def __init__(self, spec: WorkerSpec, process: trio.Process) -> None:
        self.spec = spec
        self._process = process
        assert process.stdout is not None and process.stdin is not None  # opened with PIPE
        self._out = _Lines(process.stdout)
        self._in = process.stdin

    async def _expect(self, word: str) -> str:
        while True:  # a worker's log lines go to stderr; skip anything else on stdout
            line = await self._out.line()
            if line.startswith(word):
                return line[len(word) :].strip()

    async def wait_ready(self) -> None:
        with trio.fail_after(30 + READY_TIMEOUT_PER_NODE * self.spec.nodes):
            await self._expect("ready")

    async def go(self) -> None:
        await self._in.send_all(b"go\n")

    async def stop(self) -> SliceStatistics:
        with trio.fail_after(STOP_TIMEOUT):
            await self._in.send_all(b"stop\n")
            found = await self._expect("stats")
            await self._process.wait()
        return SliceStatistics(**json.loads(found))

    async def kill(self) -> None:
        if self._process.returncode is None:
            self._process.kill()
        with trio.move_on_after(10):
            await self._process.wait()


@asynccontextmanager
async def open_workers(specs: Sequence[WorkerSpec]) -> AsyncIterator[list[Worker]]:
    """Start a worker per spec (call `wait_ready` on each before using it: they open their
    nodes meanwhile, while the caller opens its own); kill any still running on exit."""
    workers: list[Worker] = []
    try:
        for spec in specs:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "swarm.testing.internet_workers", json.dumps(
                    dataclasses.asdict(spec))],
                stdin=PIPE,
                stdout=PIPE,
            )  # fmt: skip
            workers.append(Worker(spec, process))
        yield workers
    finally:
        with trio.CancelScope(shield=True):
            for worker in workers:
                await worker.kill()


async def _serve(spec: WorkerSpec) -> None:
    plane = DHTSlice(
        seed=spec.seed, name=spec.name, intra=spec.intra, inter=spec.inter, loss=spec.loss,
        ttl=spec.ttl, blocks=spec.blocks, verified_cache=spec.verified_cache,
    )  # fmt: skip
    try:
        await plane.open(spec.nodes, (spec.bootstrap,))
        plane.joined()
        await plane.turn_sybils(range(spec.nodes), spec.sybils, spec.junk)
        print("ready", flush=True)
        lines = _Lines(trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())))
        before = plane.statistics()
        while True:
            try:
                command = await lines.line()
            except SwarmError:
                command = "stop"
            if command == "go":
                before = plane.statistics()
            elif command == "stop":
                break
        after = plane.statistics()
        delta: dict[str, Any] = {
            field.name: getattr(after, field.name) - getattr(before, field.name)
            for field in dataclasses.fields(after)
        }
        delta["honest"] = after.honest
        print("stats", json.dumps(delta), flush=True)
    finally:
        await plane.aclose()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one worker of swarm.testing.internet")
    parser.add_argument("spec", help="a WorkerSpec as JSON")
    args = parser.parse_args(argv)
    fields: dict[str, Any] = json.loads(args.spec)
    fields["intra"], fields["inter"] = tuple(fields["intra"]), tuple(fields["inter"])
    spec = WorkerSpec(**fields)
    if not (spec.nodes > 0 and math.isfinite(spec.loss)):
        raise SystemExit(f"bad worker spec: {args.spec}")
    trio.run(_serve, spec)


if __name__ == "__main__":
    main()
