"""The gateway under the hostile clients of issue 25 (items 1-4), figures for the note.

    python benchmarks/gateway_attacks.py                     # this tree
    python benchmarks/gateway_attacks.py --tree /tmp/old     # another checkout's swarm/ + cli/

One `swarm dht`, one `swarm serve` (swarm-demo, all 6 layers) and one `swarm api
--max-concurrent 2 --queue 2` with its defaults otherwise (no flag the older gateway lacks,
so both trees run the same command). Attackers run in a child process under ``nice -n 19``
(as the issue did). It prints, one line each:

1. a 40-token stream while two clients post 1 MB one-word prompts in a loop: its time, the
   median gap between tokens, the slowest ``/health`` meanwhile;
2. two clients that ask for 400 streamed tokens and never read: how long until a third
   client's 4-token completion is answered, and with what status;
3. 200 connections from one host, each a request head and 10 of 1000 body bytes: how many
   are still open 5 s and 40 s later, and a completion's time meanwhile;
4. the status of each hostile field (seeds past 64 bits, lone surrogates).

Not a test: nothing here asserts. Seconds are inflated on a loaded machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx2 as httpx

from swarm.shards.bundled import demo_model_path
from swarm.testing.hostile_http import half_sent_request, is_closed, stalled_stream
from swarm.testing.processes import ProcessGroup, swarm_command

MODEL = str(demo_model_path())
NAME = "swarm-demo"
FLOOD = """
import json, sys
from swarm.testing.hostile_http import Flood
flood = Flood(sys.argv[1], json.dumps({"model": "swarm-demo", "prompt": "a" * 1_000_000,
              "max_tokens": 1}).encode(), threads=2).start()
sys.stdin.read()
flood.stop()
print(json.dumps(flood.statuses))
"""


def stream_gaps(url: str, tokens: int) -> tuple[float, list[float]]:
    body = {
        "model": NAME,
        "prompt": "The list",
        "max_tokens": tokens,
        "stream": True,
        "temperature": 0,
    }
    started = time.monotonic()
    stamps = []
    with (
        httpx.Client(timeout=300) as http,
        http.stream("POST", url + "/v1/completions", json=body) as response,
    ):
        for line in response.iter_lines():
            if line.startswith("data: "):
                stamps.append(time.monotonic())
    gaps = [b - a for a, b in itertools.pairwise(stamps[1:])]
    return time.monotonic() - started, gaps


def completion(url: str, timeout: float = 120) -> tuple[int, float]:
    started = time.monotonic()
    try:
        status = httpx.post(
            url + "/v1/completions",
            timeout=timeout,
            json={"model": NAME, "prompt": "The list", "max_tokens": 4},
        ).status_code
    except httpx.HTTPError:
        status = 0
    return status, time.monotonic() - started


def attack_tokenizing(url: str, env: dict[str, str]) -> str:
    flood = subprocess.Popen(
        ["nice", "-n", "19", sys.executable, "-c", FLOOD, url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    health: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                httpx.get(url + "/health", timeout=60)
            except httpx.HTTPError:
                pass
            health.append(time.monotonic() - started)
            time.sleep(0.2)

    try:
        time.sleep(2)
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        took, gaps = stream_gaps(url, 40)
        stop.set()
        poller.join(timeout=60)
    finally:
        out, _ = flood.communicate("", timeout=120)
    return (
        f"1 tokenizing flood: 40-token stream {took:.1f} s, median gap "
        f"{statistics.median(gaps) * 1000:.0f} ms, slowest /health {max(health):.2f} s; "
        f"flood answers {out.strip()}"
    )


def attack_non_readers(url: str) -> str:
    body = {"model": NAME, "prompt": "The list", "max_tokens": 400, "temperature": 0}
    socks = [stalled_stream(url, body) for _ in range(2)]
    time.sleep(2)
    status, took = completion(url, timeout=120)
    for sock in socks:
        sock.close()
    return f"2 two non-readers: a third client's completion got {status} after {took:.1f} s"


def attack_slowloris(url: str) -> str:
    socks = []
    for _ in range(200):
        try:
            socks.append(half_sent_request(url))
        except OSError:
            break
    time.sleep(5)
    open_5 = sum(not is_closed(s, 0.01) for s in socks)
    status, took = completion(url, timeout=60)
    time.sleep(max(0.0, 35 - took))
    open_40 = sum(not is_closed(s, 0.01) for s in socks)
    for sock in socks:
        sock.close()
    return (
        f"3 slowloris x{len(socks)}: open after 5 s {open_5}, after 40 s {open_40}; "
        f"a completion meanwhile {status} in {took:.1f} s"
    )


def attack_slowloris_hosts(url: str, hosts: int = 8, per_host: int = 64) -> str:
    """Half-sent bodies from ``hosts`` loopback addresses, ``per_host`` each (by default the
    gateway's whole 512), then a completion from another host, retried until it is 200."""
    socks = []
    for index in range(hosts):
        for _ in range(per_host):
            try:
                socks.append(half_sent_request(url, source=f"127.0.0.{40 + index}"))
            except OSError:
                break
    time.sleep(2)
    started, tries, status = time.monotonic(), 0, 0
    transport = httpx.HTTPTransport(local_address="127.0.0.60")
    with httpx.Client(transport=transport, timeout=60) as client:
        while status != 200 and time.monotonic() - started < 60:
            tries += 1
            try:
                body = {"model": NAME, "prompt": "The list", "max_tokens": 4}
                status = client.post(url + "/v1/completions", json=body).status_code
            except httpx.HTTPError:
                time.sleep(0.5)
    took = time.monotonic() - started
    still_open = sum(not is_closed(s, 0.01) for s in socks)
    for sock in socks:
        sock.close()
    return (
        f"5 slowloris from {hosts} hosts x{len(socks)}: another host's completion {status} "
        f"after {took:.1f} s ({tries} tries); attackers' sockets open then {still_open}"
    )


def hostile_fields(url: str) -> str:
    bodies = {
        "seed 2^64": '{"model": "swarm-demo", "prompt": "x", "seed": 18446744073709551616}',
        "seed -2^63-1": '{"model": "swarm-demo", "prompt": "x", "seed": -9223372036854775809}',
        "lone surrogate": '{"model": "swarm-demo", "prompt": "\\ud800"}',
        "redundant:99": '{"model": "swarm-demo", "prompt": "x", '
        '"swarm": {"verify": "redundant:99"}}',
    }
    out = []
    for name, body in bodies.items():
        response = httpx.post(
            url + "/v1/completions",
            content=body,
            timeout=60,
            headers={"content-type": "application/json"},
        )
        out.append(f"{name} -> {response.status_code}")
    return "4 fields: " + ", ".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", type=Path, help="run the gateway of this checkout")
    parser.add_argument(
        "--only", choices=["fields", "tokenizing", "non-readers", "slowloris", "hosts"]
    )
    args = parser.parse_args()
    env = {"HOME": tempfile.mkdtemp(), "OMP_NUM_THREADS": "1"}
    if args.tree is not None:  # its swarm/ and cli/ (as swarm_cli) first on the path
        paths = Path(tempfile.mkdtemp())
        (paths / "swarm").symlink_to(args.tree.resolve() / "swarm")
        (paths / "swarm_cli").symlink_to(args.tree.resolve() / "cli")
        env["PYTHONPATH"] = str(paths)
    with ProcessGroup(env=env) as group:
        _, dht = group.start_dht()
        server = group.start(
            "server", swarm_command("serve", MODEL, "--layers", "0:6", "--initial-peers", dht)
        )
        server.wait_for_line(r"ready: peer", 120)
        gateway = group.start(
            "gateway",
            swarm_command(
                "api",
                MODEL,
                "--initial-peers",
                dht,
                "--port",
                "0",
                "--max-concurrent",
                "2",
                "--queue",
                "2",
                "--canary-interval",
                "0",
            ),
        )
        url = gateway.wait_for_line(r"ready: swarm api at (http://\S+) ", 120).group(1)
        completion(url)  # warm up
        attacks = {
            "fields": lambda: hostile_fields(url),
            "tokenizing": lambda: attack_tokenizing(url, {**os.environ, "HOME": env["HOME"]}),
            "non-readers": lambda: attack_non_readers(url),
            "slowloris": lambda: attack_slowloris(url),
            "hosts": lambda: attack_slowloris_hosts(url),
        }
        for name, attack in attacks.items():
            if args.only in (None, name):
                print(attack(), flush=True)
        print(json.dumps({"tree": str(args.tree or "this")}))


if __name__ == "__main__":
    main()
