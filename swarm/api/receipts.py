"""The receipts of recent completions, kept for a bounded time and count.

Every answer's ``swarm`` object carries the digests of the servers' signed step receipts;
the full receipts (`receipt_json`: every field, bytes in hex) are kept here under the
completion's id for ``GET /v1/swarm/receipts/{id}``, so a caller can check the signatures
later (`swarm.verify.check_receipt`). The store forgets the oldest completion past
``keep`` and any completion older than ``ttl_s``. Each entry remembers the key that made
it (a fingerprint; None on a keyless gateway), and only that key reads it: another key gets
the same answer as for an unknown id.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from swarm.net.messages import Receipt, encode_message
from swarm.types import PeerId

__all__ = ["ReceiptStore", "receipt_digest", "receipt_json"]


def receipt_digest(receipt: Receipt) -> str:
    """Hex SHA-256 of the encoded receipt (as the server signed and sent it)."""
    return hashlib.sha256(encode_message(receipt)).hexdigest()


def receipt_json(receipt: Receipt) -> dict[str, Any]:
    """A receipt as JSON: its fields (bytes as hex), the signer's peer id and its digest."""
    return {
        "digest": receipt_digest(receipt),
        "peer": str(PeerId.from_public_key(receipt.public_key)),
        "model_id": receipt.model_id,
        "layers": [receipt.layer_range.start, receipt.layer_range.stop],
        "session_id": receipt.session_id.hex(),
        "step": receipt.step,
        "input_sha256": receipt.input_sha256.hex(),
        "output_sha256": receipt.output_sha256.hex(),
        "public_key": receipt.public_key.hex(),
        "signature": receipt.signature.hex(),
        "encoded": encode_message(receipt).hex(),
    }


class ReceiptStore:
    """Completion id -> its receipts, bounded by ``keep`` entries and ``ttl_s`` seconds."""

    def __init__(
        self, keep: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.keep = keep
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, str | None, tuple[Receipt, ...]]] = (
            OrderedDict()
        )

    def __len__(self) -> int:
        self._expire()
        return len(self._entries)

    def put(
        self, completion_id: str, receipts: Sequence[Receipt], owner: str | None = None
    ) -> None:
        self._entries[completion_id] = (self._clock(), owner, tuple(receipts))
        self._entries.move_to_end(completion_id)
        while len(self._entries) > self.keep:
            self._entries.popitem(last=False)
        self._expire()

    def get(self, completion_id: str, owner: str | None = None) -> tuple[Receipt, ...] | None:
        """The receipts of a completion made by ``owner``, or None when unknown, forgotten
        or made by another key."""
        self._expire()
        entry = self._entries.get(completion_id)
        if entry is None or entry[1] != owner:
            return None
        return entry[2]

    def _expire(self) -> None:
        oldest = self._clock() - self.ttl_s
        while self._entries:
            first = next(iter(self._entries.values()))
            if first[0] >= oldest:
                break
            self._entries.popitem(last=False)
