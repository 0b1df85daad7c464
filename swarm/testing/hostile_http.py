"""Hostile HTTP clients of the gateway, for tests and benchmarks (plain sockets, no HTTP
library between the attacker and the wire).

- `stalled_stream`: asks for a long streamed generation and never reads the answer (its
  receive buffer set small first, so the gateway's sends stall soon);
- `half_sent_request`: sends a request head and part of the body it announced, then waits;
- `flood`: a thread that posts the same body in a loop until stopped (e.g. prompts that are
  expensive to tokenize).

Every socket may be bound to a chosen loopback source (``127.0.0.2``...) to play another
host. Close what these return; each has a timeout so nothing here waits forever.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

__all__ = ["Flood", "half_sent_request", "is_closed", "request_head", "stalled_stream"]


def _open(url: str, source: str | None, rcvbuf: int | None = None) -> socket.socket:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(10)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if source is not None:
        sock.bind((source, 0))
    sock.connect((host if host != "0.0.0.0" else "127.0.0.1", parts.port or 80))
    return sock


def request_head(
    url: str, path: str, length: int, headers: Mapping[str, str] | None = None
) -> bytes:
    """An HTTP/1.1 POST head for ``path`` announcing a JSON body of ``length`` bytes."""
    netloc = urlsplit(url).netloc.replace("0.0.0.0", "127.0.0.1")
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {netloc}",
        "Content-Type: application/json",
        f"Content-Length: {length}",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def stalled_stream(
    url: str,
    body: Mapping[str, Any],
    *,
    source: str | None = None,
    rcvbuf: int = 4096,
    path: str = "/v1/completions",
) -> socket.socket:
    """A connection that asked for ``body`` (streamed) and will never read a byte."""
    data = json.dumps({**body, "stream": True}).encode()
    sock = _open(url, source, rcvbuf)
    sock.sendall(request_head(url, path, len(data)) + data)
    return sock


def half_sent_request(
    url: str,
    *,
    source: str | None = None,
    announced: int = 1000,
    sent: int = 10,
    path: str = "/v1/completions",
) -> socket.socket:
    """A connection that sent a whole head and ``sent`` of the ``announced`` body bytes."""
    sock = _open(url, source)
    sock.sendall(request_head(url, path, announced) + b"{" + b" " * (sent - 1))
    return sock


def is_closed(sock: socket.socket, wait: float = 0.2) -> bool:
    """Whether the gateway closed ``sock`` (an answer it sent first is read and dropped)."""
    sock.settimeout(wait)
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return True
    except TimeoutError:
        return False
    except OSError:
        return True


@dataclass
class Flood:
    """Threads that post ``body`` to ``url + path`` in a loop until `stop` (answers are read
    and counted by status)."""

    url: str
    body: bytes
    path: str = "/v1/completions"
    threads: int = 2
    sources: tuple[str | None, ...] = (None,)
    statuses: dict[int, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _running: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Flood:
        for i in range(self.threads):
            source = self.sources[i % len(self.sources)]
            thread = threading.Thread(target=self._run, args=(source,), daemon=True)
            thread.start()
            self._running.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._running:
            thread.join(timeout=30)

    def _run(self, source: str | None) -> None:
        while not self._stop.is_set():
            try:
                sock = _open(self.url, source)
                with sock:
                    sock.settimeout(60)
                    sock.sendall(request_head(self.url, self.path, len(self.body)) + self.body)
                    status = _read_status(sock)
            except OSError:
                status = 0
                time.sleep(0.05)
            self.statuses[status] = self.statuses.get(status, 0) + 1


def _read_status(sock: socket.socket) -> int:
    head = b""
    while b"\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            return 0
        head += chunk
    return int(head.split(b" ", 2)[1])
