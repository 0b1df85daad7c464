"""Private swarms: a dialer without the swarm key learns nothing that identifies the server.

The outsider here speaks the real protocol as far as it can without the key: it sends a
correct hello and first message, decrypts everything the server sends that its own Noise
state can decrypt (message 2 is keyed by ephemeral-ephemeral DH only, so it can), answers
with a well-formed third message, and keeps every byte the server sends until it hangs up.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import pytest
import trio

from swarm.errors import PeerIdMismatch, SwarmKeyMismatch
from swarm.identity import Identity
from swarm.net.handshake import open_channel
from swarm.net.hello import PROTOCOL_VERSION
from swarm.net.noise import HandshakeState, KeyPair
from swarm.net.rpc_server import RpcServer
from swarm.net.transport import TCPTransport

from .conftest import ALICE

SWARM_KEY = b"K" * 32
SERVER_ONE = Identity.from_seed(b"private-server-one")
SERVER_TWO = Identity.from_seed(b"private-server-two")
HELLO_PRIVATE = b"SWRM" + bytes([PROTOCOL_VERSION, 1])


@dataclass(frozen=True)
class Probe:
    """What an outsider got from one connection attempt."""

    hello: bytes  # the server's hello
    message2: bytes  # raw handshake message 2, as sent
    payload2: bytes  # its payload, decrypted by the outsider
    static: bytes  # the server's Noise static key, decrypted by the outsider
    after: bytes  # every byte the server sent after the outsider's third message


async def _read_exact(stream: trio.SocketStream, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = await stream.receive_some(n - len(out))
        assert chunk, f"server hung up after {len(out)} of {n} bytes"
        out += chunk
    return out


async def _read_to_eof(stream: trio.SocketStream) -> bytes:
    out = b""
    try:
        while chunk := await stream.receive_some():
            out += chunk
    except trio.BrokenResourceError:
        pass  # a reset after the server closed: nothing more to read either way
    return out


async def _probe(port: int) -> Probe:
    """One outsider attempt with a wrong swarm key (it cannot know the right one)."""
    state = HandshakeState(
        initiator=True, static=KeyPair.generate(), prologue=HELLO_PRIVATE, psk=os.urandom(32)
    )
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            message1 = state.write_message()
            await stream.send_all(HELLO_PRIVATE + struct.pack(">H", len(message1)) + message1)
            hello = await _read_exact(stream, 6)
            (length,) = struct.unpack(">H", await _read_exact(stream, 2))
            message2 = await _read_exact(stream, length)
            payload2 = state.read_message(message2)
            assert state.remote_static is not None
            message3 = state.write_message(os.urandom(96))  # shaped like an identity proof
            await stream.send_all(struct.pack(">H", len(message3)) + message3)
            after = await _read_to_eof(stream)
    return Probe(hello, message2, payload2, state.remote_static, after)


async def _probe_servers(*identities: Identity, rounds: int = 2) -> list[list[Probe]]:
    transport = TCPTransport()
    results: list[list[Probe]] = []
    async with trio.open_nursery() as nursery:
        for identity in identities:
            server = RpcServer(identity, object(), transport=transport, swarm_key=SWARM_KEY)
            port = await nursery.start(server.serve, "127.0.0.1", 0)
            results.append([await _probe(port) for _ in range(rounds)])
        nursery.cancel_scope.cancel()
    return results


def _identifying(identity: Identity) -> list[bytes]:
    return [identity.public_key, identity.peer_id.digest]


async def test_outsider_learns_no_identity_from_a_private_server() -> None:
    one, two = await _probe_servers(SERVER_ONE, SERVER_TWO)
    for probes, identity in ((one, SERVER_ONE), (two, SERVER_TWO)):
        for probe in probes:
            seen = probe.hello + probe.message2 + probe.payload2 + probe.static + probe.after
            for secret in _identifying(identity):
                assert secret not in seen
            assert probe.payload2 == b"", "message 2 must carry no identity proof"
            assert probe.after == b"", "nothing is sent to a dialer that failed the key step"
        # The Noise static key is fresh per connection, so it identifies nothing either.
        assert probes[0].static != probes[1].static
    # What an outsider can see is the same for both servers, byte for byte where it is
    # not fresh randomness (hello, sizes, decrypted payload, what follows).
    shape = [(p.hello, len(p.message2), p.payload2, p.after) for p in one + two]
    assert len(set(shape)) == 1, shape


async def test_key_holder_still_gets_the_peer_id_bound() -> None:
    transport = TCPTransport()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = RpcServer(SERVER_ONE, object(), transport=transport, swarm_key=SWARM_KEY)
            port = await nursery.start(server.serve, "127.0.0.1", 0)
            channel = await open_channel(
                transport,
                "127.0.0.1",
                port,
                ALICE,
                expected_peer=SERVER_ONE.peer_id,
                swarm_key=SWARM_KEY,
            )
            assert channel.remote_peer_id == SERVER_ONE.peer_id
            await channel.aclose()
            with pytest.raises(PeerIdMismatch, match="expected peer"):
                await open_channel(
                    transport,
                    "127.0.0.1",
                    port,
                    ALICE,
                    expected_peer=SERVER_TWO.peer_id,
                    swarm_key=SWARM_KEY,
                )
            with pytest.raises(SwarmKeyMismatch):
                await open_channel(transport, "127.0.0.1", port, ALICE, swarm_key=b"W" * 32)
            nursery.cancel_scope.cancel()
