"""swarm.dht: a Kademlia DHT with signed, expiring, multi-writer records (DESIGN.md §5)."""

from swarm.dht.config import (
    AdmissionConfig,
    DHTConfig,
    KademliaConfig,
    ProofConfig,
    StorageConfig,
    TimingConfig,
)
from swarm.dht.links import DatagramLinks
from swarm.dht.node import DHTNode
from swarm.dht.proofs import RecordProver
from swarm.dht.records import DropReason, Record
from swarm.dht.sources import PrivateGroups
from swarm.dht.stats import DHTStatistics

__all__ = [
    "AdmissionConfig",
    "DHTConfig",
    "DHTNode",
    "DHTStatistics",
    "DatagramLinks",
    "DropReason",
    "KademliaConfig",
    "PrivateGroups",
    "ProofConfig",
    "Record",
    "RecordProver",
    "StorageConfig",
    "TimingConfig",
]
