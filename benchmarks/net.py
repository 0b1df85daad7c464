"""Secure channel + RPC vs plain trio TCP on loopback, in one run.

For each case the same msgpack messages (`swarm.net.messages`) go both ways:

- secure: `ConnectionPool` -> Noise channel (ChaCha20-Poly1305 frames) -> `RpcServer`;
- plain: a 4-byte length prefix + the same encoded message over a trio TCP stream, decoded
  by the other side, no encryption, no RPC envelope.

Printed: median round trip of a small call (InfoRequest -> InfoResponse), and throughput of
1 MB and 16 MB tensor messages (ForwardRequest with a float16 tensor -> small reply), with
the ratio secure/plain. Client and server share one process and one trio thread.

    python benchmarks/net.py [--rounds 2000] [--mb-rounds 60] [--big-rounds 8]
"""

from __future__ import annotations

import argparse
import statistics
import struct
import time

import torch
import trio

from swarm.identity import Identity
from swarm.net import (
    CallContext,
    ForwardRequest,
    ForwardResponse,
    HandlerRegistry,
    InfoRequest,
    InfoResponse,
    RpcServer,
    Unary,
    decode_message,
    encode_message,
    open_connection_pool,
)
from swarm.net.surface import INFO as INFO_METHOD
from swarm.net.surface import call_info
from swarm.types import LayerRange

INFO = InfoResponse(LayerRange(0, 8), "online", 0.1, 4096, "bench", 100.0)
ACK = ForwardResponse(torch.zeros(1, dtype=torch.float16))
SERVER = Identity.from_seed(b"bench-server")
CLIENT = Identity.from_seed(b"bench-client")


SINK = Unary("sink", ForwardRequest, ForwardResponse)  # a forward that computes nothing


async def rpc_info(request: InfoRequest, ctx: CallContext) -> InfoResponse:
    return INFO


async def rpc_sink(request: ForwardRequest, ctx: CallContext) -> ForwardResponse:
    return ACK


HANDLERS = HandlerRegistry([INFO_METHOD.bind(rpc_info), SINK.bind(rpc_sink)])


def tensor_request(nbytes: int) -> ForwardRequest:
    hidden = torch.randn(1, nbytes // 2 // 4096, 4096).to(torch.float16)  # (batch, seq, hidden)
    return ForwardRequest(
        hidden, torch.zeros(1, hidden.shape[1], dtype=torch.int64), LayerRange(0, 1)
    )


# ---- plain TCP baseline ----


async def _read_exactly(stream: trio.SocketStream, buf: bytearray, n: int) -> bytes | bytearray:
    """Exactly n bytes; like swarm.net's reader, large reads fill one preallocated buffer."""
    if n > 256 * 1024:
        out = bytearray(n)
        view = memoryview(out)
        filled = len(buf)
        view[:filled] = buf
        buf.clear()
        while filled < n:
            chunk = await stream.receive_some(min(n - filled, 256 * 1024))
            if not chunk:
                raise EOFError
            view[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
        return out
    while len(buf) < n:
        chunk = await stream.receive_some(max(n - len(buf), 4096))
        if not chunk:
            raise EOFError
        buf += chunk
    small = bytes(buf[:n])
    del buf[:n]
    return small


async def _read_frame(stream: trio.SocketStream, buf: bytearray) -> bytes | bytearray:
    (size,) = struct.unpack(">I", await _read_exactly(stream, buf, 4))
    return await _read_exactly(stream, buf, size)


async def _send_frame(stream: trio.SocketStream, data: bytes) -> None:
    await stream.send_all(struct.pack(">I", len(data)) + data)


async def plain_server(stream: trio.SocketStream) -> None:
    buf = bytearray()
    try:
        while True:
            request = decode_message(await _read_frame(stream, buf))
            reply = INFO if isinstance(request, InfoRequest) else ACK
            await _send_frame(stream, encode_message(reply))
    except (EOFError, trio.BrokenResourceError):
        return


async def plain_call(stream: trio.SocketStream, buf: bytearray, request: object) -> object:
    await _send_frame(stream, encode_message(request))  # type: ignore[arg-type]
    return decode_message(await _read_frame(stream, buf))


# ---- measurements ----


async def measure(call: object, request: object, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        await call(request)  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return times


async def interleaved(
    secure: object, plain: object, request: object, rounds: int, blocks: int
) -> tuple[list[float], list[float]]:
    """Times of `rounds` secure and `rounds` plain calls, alternating in `blocks` blocks."""
    sec: list[float] = []
    pla: list[float] = []
    per_block = max(1, rounds // blocks)
    while len(sec) < rounds:
        sec += await measure(secure, request, per_block)
        pla += await measure(plain, request, per_block)
    return sec, pla


async def run(rounds: int, mb_rounds: int, big_rounds: int) -> None:
    torch.set_num_threads(1)
    small = InfoRequest()
    cases = [
        ("1 MB tensor", tensor_request(1 << 20), mb_rounds),
        ("16 MB tensor", tensor_request(16 << 20), big_rounds),
    ]
    async with trio.open_nursery() as nursery:
        server = RpcServer(SERVER, HANDLERS)
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        plain_port = listeners[0].socket.getsockname()[1]
        await nursery.start(trio.serve_listeners, plain_server, listeners)
        plain = await trio.open_tcp_stream("127.0.0.1", plain_port)
        buf = bytearray()

        async def plain_do(req: object) -> object:
            return await plain_call(plain, buf, req)

        async with open_connection_pool(CLIENT) as pool:
            conn = await pool.get("127.0.0.1", port, SERVER.peer_id)

            async def secure_small(req: InfoRequest) -> object:
                return await call_info(conn)

            async def secure_sink(req: ForwardRequest) -> object:
                return await SINK.call(conn, req, timeout=60)

            await measure(secure_small, small, 100)  # warm up
            await measure(plain_do, small, 100)
            # Interleave secure and plain in blocks so machine load hits both alike.
            sec_t, pla_t = await interleaved(secure_small, plain_do, small, rounds, blocks=20)
            sec, pla = statistics.median(sec_t), statistics.median(pla_t)
            print(f"{'case':<22}{'secure':>14}{'plain TCP':>14}{'ratio':>9}")
            print(
                f"{'small RPC round trip':<22}{sec * 1e3:>11.3f} ms{pla * 1e3:>11.3f} ms"
                f"{sec / pla:>8.2f}x  (secure/plain; aim <= 2x)"
            )
            for name, req, n in cases:
                nbytes = req.hidden_states.numel() * 2
                await measure(secure_sink, req, 2)
                await measure(plain_do, req, 2)
                sec_t, pla_t = await interleaved(secure_sink, plain_do, req, n, blocks=n)
                s_tp = nbytes * n / sum(sec_t) / 1e6
                p_tp = nbytes * n / sum(pla_t) / 1e6
                print(
                    f"{name:<22}{s_tp:>9.0f} MB/s{p_tp:>9.0f} MB/s{s_tp / p_tp:>8.2f}x"
                    "  (secure/plain; aim >= 0.5x)"
                )
        await plain.aclose()
        nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--mb-rounds", type=int, default=60)
    parser.add_argument("--big-rounds", type=int, default=8)
    args = parser.parse_args()
    trio.run(run, args.rounds, args.mb_rounds, args.big_rounds)


if __name__ == "__main__":
    main()
