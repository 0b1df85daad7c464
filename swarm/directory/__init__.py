"""The swarm's namespace in the DHT: key formats, the one strict decoder of server
announcements (used by clients and servers alike), and evidence with its material."""

from swarm.directory.coverage import missing_blocks, missing_ranges, servers_per_block
from swarm.directory.evidence import (
    DHTEvidenceBoard,
    fetch_evidence,
    fetch_material_bytes,
)
from swarm.directory.family import announce_model_id, mismatch_hint, other_model_ids
from swarm.directory.keys import (
    block_key,
    block_keys,
    evidence_key,
    family_key,
    material_key,
    model_family,
    relay_key,
)
from swarm.directory.prover import AnnouncementProver
from swarm.directory.relays import RelayView, address_group, relays_from_records, spread
from swarm.directory.servers import (
    MAX_THROUGHPUT,
    PROBE_SLACK,
    ServerView,
    counted_throughput,
    decode_announcement,
    delivered_by_peers,
    dial_address,
    ping_server,
    servers_from_records,
    with_relay_loads,
)

__all__ = [
    "MAX_THROUGHPUT",
    "PROBE_SLACK",
    "AnnouncementProver",
    "DHTEvidenceBoard",
    "RelayView",
    "ServerView",
    "address_group",
    "announce_model_id",
    "block_key",
    "block_keys",
    "counted_throughput",
    "decode_announcement",
    "delivered_by_peers",
    "dial_address",
    "evidence_key",
    "family_key",
    "fetch_evidence",
    "fetch_material_bytes",
    "material_key",
    "mismatch_hint",
    "missing_blocks",
    "missing_ranges",
    "model_family",
    "other_model_ids",
    "ping_server",
    "relay_key",
    "relays_from_records",
    "servers_from_records",
    "servers_per_block",
    "spread",
    "with_relay_loads",
]
