"""Proving announcements: a storing DHT node asks whether the server a record names really
answers as its `PeerId` at its announced address (a `swarm.dht.RecordProver`).

Records proven this way are kept before unproven ones when a key is full (`swarm.dht`), so a
factory of identities that announces junk, or addresses it does not own, cannot crowd out
servers that answer. Proving is one Noise handshake, rate-limited and cached by the DHT.
"""

from __future__ import annotations

from collections.abc import Hashable

import trio

from swarm.dht.records import Record
from swarm.directory.keys import parse_block_key
from swarm.directory.servers import decode_announcement, dial_address
from swarm.errors import ProtocolError, SwarmError
from swarm.identity import Identity
from swarm.net.config import NetConfig
from swarm.net.handshake import open_channel
from swarm.net.transport import TCPTransport, Transport
from swarm.types import PeerId

__all__ = ["AnnouncementProver"]


class AnnouncementProver:
    """Proves a block announcement by a handshake with the server it names.

    ``claim`` (on the DHT's thread: decoding only) turns a record under a block key into
    ``(peer id, host, port)``; ``prove`` dials that address and is True when the peer there
    completes a handshake as that `PeerId`. Records under other keys claim nothing.
    """

    def __init__(
        self,
        identity: Identity,
        *,
        transport: Transport | None = None,
        swarm_key: bytes | None = None,
        config: NetConfig | None = None,
    ) -> None:
        self.identity = identity
        self.transport = transport or TCPTransport()
        self.swarm_key = swarm_key
        self.config = config or NetConfig()

    def claim(self, record: Record) -> Hashable | None:
        parsed = parse_block_key(record.key)
        if parsed is None or record.value is None:
            return None
        try:
            ann = decode_announcement(dict(record.value), parsed[1], None)
        except ProtocolError:
            return None
        host, port = dial_address(ann)
        return (record.peer_id.digest, host, port)

    async def prove(self, claim: Hashable) -> bool:
        if not isinstance(claim, tuple) or len(claim) != 3:
            return False  # not one of ours
        digest, host, port = claim
        try:
            channel = await open_channel(
                self.transport,
                str(host),
                int(port),
                self.identity,
                expected_peer=PeerId(bytes(digest)),
                swarm_key=self.swarm_key,
                config=self.config,
            )
        except SwarmError:
            return False
        with trio.CancelScope(shield=True):
            await channel.aclose()
        return True
