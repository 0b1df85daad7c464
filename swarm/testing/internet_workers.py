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
the worker prints ``ready`` once its nodes have joined, with the index, port and peer id of
each of its honest nodes; ``go`` starts its counts; ``stop`` (or the end of its stdin) makes
it print its `SliceStatistics` as JSON, close its nodes and exit. Every wait has a
deadline; a worker that misses one is killed.

The coordinator's servers, clients and probes also act through the workers' honest nodes
(`Worker.nodes`: `swarm.testing.internet_ops.RemoteNode`s): each DHT operation through one
of them goes to the worker over a socketpair of its own (`swarm.testing.internet_ops`),
so the workers' processes do the costly initiating side of the DHT's work.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from subprocess import PIPE
from typing import Any

import trio

from swarm.errors import SwarmError
from swarm.testing.internet_ops import Frames, OpChannel, RemoteNode, serve_ops
from swarm.testing.internet_plane import DHTSlice, SliceStatistics, freeze_heap
from swarm.types import PeerId

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

    def __init__(
        self, spec: WorkerSpec, number: int, process: trio.Process, ops: trio.SocketStream
    ) -> None:
        self.spec = spec
        self.number = number  # the coordinator is 0
        self._process = process
        assert process.stdout is not None and process.stdin is not None  # opened with PIPE
        self._out = _Lines(process.stdout)
        self._in = process.stdin
        self.channel = OpChannel(ops)
        self.nodes: list[RemoteNode] = []  # its honest nodes, once ready

    async def _expect(self, word: str) -> str:
        while True:  # a worker's log lines go to stderr; skip anything else on stdout
            line = await self._out.line()
            if line.startswith(word):
                return line[len(word) :].strip()

    async def wait_ready(self) -> None:
        """Wait until its nodes have joined; learn its honest nodes (`nodes`)."""
        with trio.fail_after(30 + READY_TIMEOUT_PER_NODE * self.spec.nodes):
            ready = json.loads(await self._expect("ready"))
        self.nodes = [
            RemoteNode(self.channel, self.number, index, PeerId(bytes.fromhex(peer)), port)
            for index, port, peer in ready["nodes"]
        ]

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
        async with trio.open_nursery() as nursery:
            for number, spec in enumerate(specs, 1):
                ours, theirs = socket.socketpair()
                with ours, theirs:
                    process = await trio.lowlevel.open_process(
                        [sys.executable, "-m", "swarm.testing.internet_workers", json.dumps(
                            dataclasses.asdict(spec)), "--ops-fd", str(theirs.fileno())],
                        stdin=PIPE, stdout=PIPE, pass_fds=(theirs.fileno(),),
                    )  # fmt: skip
                    stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours.dup()))
                workers.append(Worker(spec, number, process, stream))
                nursery.start_soon(workers[-1].channel.run)
            yield workers
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            for worker in workers:
                await worker.kill()


async def _serve(spec: WorkerSpec, ops_fd: int) -> None:
    ops = trio.SocketStream(trio.socket.from_stdlib_socket(socket.socket(fileno=ops_fd)))
    plane = DHTSlice(
        seed=spec.seed, name=spec.name, intra=spec.intra, inter=spec.inter, loss=spec.loss,
        ttl=spec.ttl, blocks=spec.blocks, verified_cache=spec.verified_cache,
    )  # fmt: skip
    try:
        await plane.open(spec.nodes, (spec.bootstrap,))
        plane.joined()
        await plane.turn_sybils(range(spec.nodes), spec.sybils, spec.junk)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_ops, Frames(ops), plane.nodes, plane.stacks)
            honest = [
                [i, node.port, node.peer_id.hex()]
                for i, node in enumerate(plane.nodes)
                if i not in plane.sybils
            ]
            print("ready", json.dumps({"nodes": honest}), flush=True)
            before = await _until_stopped(plane)
            nursery.cancel_scope.cancel()
        delta = dataclasses.asdict(plane.statistics().since(before))
        print("stats", json.dumps(delta), flush=True)
    finally:
        await plane.aclose()


async def _until_stopped(plane: DHTSlice) -> SliceStatistics:
    """Follow the coordinator's lines until ``stop``; the statistics at ``go``."""
    lines = _Lines(trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())))
    before = plane.statistics()
    while True:
        try:
            command = await lines.line()
        except SwarmError:
            command = "stop"
        if command == "go":
            freeze_heap()
            await plane.watch_lag()
            before = plane.statistics()
        elif command == "stop":
            return before


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one worker of swarm.testing.internet")
    parser.add_argument("spec", help="a WorkerSpec as JSON")
    parser.add_argument("--ops-fd", type=int, required=True, help="the operations' socket")
    args = parser.parse_args(argv)
    fields: dict[str, Any] = json.loads(args.spec)
    fields["intra"], fields["inter"] = tuple(fields["intra"]), tuple(fields["inter"])
    spec = WorkerSpec(**fields)
    if not (spec.nodes > 0 and math.isfinite(spec.loss)):
        raise SystemExit(f"bad worker spec: {args.spec}")
    trio.run(_serve, spec, args.ops_fd)


if __name__ == "__main__":
    main()
