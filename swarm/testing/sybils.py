"""Sybil DHT nodes that answer lookups with junk (for `swarm.testing.internet` and tests).

`answer_with_junk` turns a live `DHTNode` into a liar that still answers pings (so it stays
in routing tables, unlike a silent one) but answers every ``find_node`` and ``find_value``
with junk, drawn per reply:

- contacts that point at nothing: random ids close to the key asked for (so that lookups
  prefer them) at loopback ports where nothing listens, or at the sybil's own port;
- malformed contacts (wrong types, out-of-range ports);
- for a key whose records it holds: every real record tampered with (a higher ``seq``
  and a value marked ``FORGED_MARK``, under the original signature), re-signed by the
  sybil under the victim's peer id, or with its signature cut, plus random bytes; the real
  records themselves are withheld;
- for the block keys it was told (``keys``), a record the sybil signed for itself whose
  value is no announcement, marked `JUNK_MARK` (the DHT keeps it: it is validly signed;
  the directory's strict decoder must drop it).

The honest side must find the real records anyway, and accept no forged one (a forged
record that got through would carry `FORGED_MARK` or a bumped ``seq``).

This reaches into the node's kademlia protocol on its loop thread, as the DHT's own attack
tests do: it is a testing seam, not an API of `DHTNode`.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterable
from typing import Any

import msgpack

from swarm.dht import DHTNode
from swarm.dht.protocol import key_digest
from swarm.dht.records import RECORD_VERSION, make_record
from swarm.identity import Identity

__all__ = ["FORGED_MARK", "JUNK_MARK", "JunkAnswerer", "answer_with_junk"]

FORGED_MARK = "forged-by-sybil"  # in the value of a record claiming another peer's id
JUNK_MARK = "junk-by-sybil"  # in the value of a sybil's own (validly signed) junk record
_MAX_BYTES = 4096


def _near(dkey: bytes, rng: random.Random, low_bits: int = 40) -> bytes:
    noise = rng.getrandbits(low_bits)
    return (int.from_bytes(dkey, "big") ^ noise).to_bytes(20, "big")


class JunkAnswerer:
    """The lies one sybil tells; ``replies`` and ``forged`` count what it sent (junk replies,
    forged records), so that a test can check the attack happened."""

    def __init__(self, identity: Identity, port: int, keys: Iterable[str], seed: int) -> None:
        self.replies = 0
        self.forged = 0
        self.identity = identity
        self.port = port
        self.rng = random.Random(seed)
        self.keys = {key_digest(key): key for key in keys}

    def contacts(self, dkey: bytes) -> list[Any]:
        rng = self.rng
        kind = rng.randrange(3)
        if kind == 0:  # close ids at ports where nothing listens
            return [(_near(dkey, rng), "127.0.0.1", rng.randrange(1, 1024)) for _ in range(20)]
        if kind == 1:  # close ids, all pointing at the sybil itself
            return [(_near(dkey, rng), "127.0.0.1", self.port) for _ in range(20)]
        return [  # malformed
            ("not-an-id", "127.0.0.1", 1),
            (os.urandom(20), 12345, "port"),
            (os.urandom(20), "127.0.0.1", 70000),
            [os.urandom(3)],
            None,
        ]

    def forgeries(self, dkey: bytes, held: list[bytes]) -> list[bytes]:
        out: list[bytes] = [os.urandom(self.rng.randrange(8, 300))]
        held = held[:4]  # keep the reply one datagram
        forged_value = msgpack.packb({FORGED_MARK: 1}, use_bin_type=True)
        for blob in held:
            try:
                fields = msgpack.unpackb(blob, raw=False)
                _, key, pub, pid, _value, expires_at, seq, sig = fields
            except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError):
                continue
            # tampered: a later seq and another value under the victim's own signature
            out.append(
                msgpack.packb(
                    [RECORD_VERSION, key, pub, pid, forged_value, expires_at, seq + 1000, sig],
                    use_bin_type=True,
                )
            )
            # a forged retraction (would hide the real record if it were believed)
            out.append(
                msgpack.packb(
                    [RECORD_VERSION, key, pub, pid, None, expires_at, seq + 1000, bytes(64)],
                    use_bin_type=True,
                )
            )
            # re-signed by the sybil, claiming the victim's peer id
            mine = make_record(
                self.identity, key, {FORGED_MARK: 1}, expires_at, seq + 1000, _MAX_BYTES
            )
            theirs = msgpack.unpackb(mine.encoded, raw=False)
            theirs[3] = pid
            out.append(msgpack.packb(theirs, use_bin_type=True))
        key = self.keys.get(dkey)
        if key is not None:  # validly signed by the sybil itself, but no announcement
            own = make_record(
                self.identity, key, {JUNK_MARK: 1, "layer_range": "junk"},
                time.time() + 60, 1, _MAX_BYTES,
            )  # fmt: skip
            out.append(own.encoded)
        self.forged += len(out)
        return out

    def find_node(self, sender: Any, nodeid: object, key: object) -> Any:
        dkey = key if isinstance(key, bytes) and len(key) == 20 else os.urandom(20)
        self.replies += 1
        return self.contacts(dkey)

    def find_value(self, sender: Any, nodeid: object, key: object, *, storage: Any) -> Any:
        dkey = key if isinstance(key, bytes) and len(key) == 20 else os.urandom(20)
        held = storage.get(dkey) or []
        self.replies += 1
        if held or (dkey in self.keys and self.rng.random() < 0.5):
            return {"value": self.forgeries(dkey, held)}
        return self.contacts(dkey)


async def answer_with_junk(
    node: DHTNode, identity: Identity, *, keys: Iterable[str] = (), seed: int = 0
) -> JunkAnswerer:
    """From now on, ``node`` (opened with ``identity``) answers every ``find_node`` and
    ``find_value`` with junk (see the module's docstring); it still answers pings and
    takes stores. ``keys``: the keys (e.g. the block keys) it forges records under even
    when it holds none. Returns the `JunkAnswerer`, whose counts grow as it lies."""
    liar = JunkAnswerer(identity, node.port, keys, seed)

    def install(kad: Any) -> None:
        protocol = kad.protocol
        storage = protocol.storage
        protocol.rpc_find_node = liar.find_node
        protocol.rpc_find_value = lambda sender, nodeid, key: liar.find_value(
            sender, nodeid, key, storage=storage
        )

    await node.run_on_loop(install)
    return liar
