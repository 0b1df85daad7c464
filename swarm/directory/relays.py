"""Relay announcements: the one strict decoder, and the `RelayView` built from them.

Peers that relay circuits and dial back for reachability checks (reachable servers, and
``swarm dht`` nodes unless ``--no-relay``) announce a `RelayAnnouncement` under `relay_key`.
Servers read them here to choose dial-back peers and relays across address groups.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from swarm.dht.records import Record
from swarm.errors import ProtocolError
from swarm.net.messages import RelayAnnouncement, message_from_wire
from swarm.net.transport import address_group
from swarm.types import PeerId

__all__ = ["RelayView", "address_group", "decode_relay", "relays_from_records", "spread"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RelayView:
    peer_id: PeerId
    host: str
    port: int
    circuits: int = 0
    max_circuits: int = 0

    @property
    def load(self) -> float:
        """Share of its circuits in use (1.0 when it announces none)."""
        return self.circuits / self.max_circuits if self.max_circuits else 1.0


def decode_relay(value: object) -> RelayAnnouncement:
    """The relay announcement in a record value. Raises `ProtocolError` naming the field."""
    ann: RelayAnnouncement = message_from_wire(value, "relay", expect=RelayAnnouncement)
    if ann.circuits > ann.max_circuits:
        raise ProtocolError("relay.circuits exceeds relay.max_circuits")
    return ann


def relays_from_records(records: Mapping[PeerId, Record]) -> list[RelayView]:
    """One `RelayView` per announcing peer under `relay_key` (bad records are dropped)."""
    out = []
    for peer, record in records.items():
        if record.value is None:
            continue
        try:
            ann = decode_relay(record.value)
        except ProtocolError as exc:
            log.info("dropping relay announcement of %s: %s", peer, exc)
            continue
        out.append(RelayView(peer, ann.host, ann.port, ann.circuits, ann.max_circuits))
    return out


def spread(candidates: Sequence[RelayView], count: int) -> list[RelayView]:
    """Up to ``count`` candidates, one per address group first (least loaded first within
    a round), then more from groups already used when there are not enough groups."""
    by_group: dict[str, list[RelayView]] = {}
    for view in sorted(candidates, key=lambda v: v.load):
        by_group.setdefault(address_group(view.host), []).append(view)
    chosen: list[RelayView] = []
    while len(chosen) < count and any(by_group.values()):
        for group in list(by_group):
            if by_group[group] and len(chosen) < count:
                chosen.append(by_group[group].pop(0))
    return chosen
