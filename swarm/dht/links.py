"""The seam where the DHT's datagrams meet the network, for link emulation.

A node opened with ``links`` (`DHTNode.open(..., links=...)`) asks it, for every datagram
it sends, how long the datagram is held before it goes out, or whether it is lost. Tests
and the internet simulation (`swarm.testing.links.DatagramLinkEmulator`) give a swarm on
loopback one-way delays and loss per link this way, as `swarm.testing.links.LinkEmulator`
does for TCP. Production passes nothing and sends at once.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["Address", "DatagramLinks"]

Address = tuple[str, int]


class DatagramLinks(Protocol):
    """Decides the fate of each outgoing datagram (called on the DHT loop thread)."""

    def outgoing(self, source: Address, target: Address, size: int) -> float | None:
        """Seconds to hold a datagram of ``size`` bytes from ``source`` to ``target``
        before sending it (0: at once), or None to drop it (a lost datagram)."""
        ...
