"""Port mapping on the home router. A server that finds itself unreachable asks its router
to forward its RPC port (`keep_port_mapped`), renews the lease at half its life, and removes
the mapping when it stops; the reachability check then dials the mapped public address back
(`swarm.server.reachability`).

Each way of asking is a `PortMapper` (``map`` / ``unmap``); `keep_port_mapped` tries them in
turn and keeps the first that maps:

- `UPnPPortMapper`: UPnP IGD through the `miniupnpc` library (no SSDP or SOAP written here),
  an optional dependency (``pip install 'swarm[nat]'``); its calls block, so they run in a
  worker thread, each within ``timeout``;
- `swarm.server.natpmp.NatPmpPortMapper`: PCP (RFC 6887), or NAT-PMP (RFC 6886) for a
  gateway that answers PCP in NAT-PMP: small UDP messages.

Without a library or a router that answers, mapping is skipped (logged) and relays take over.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import trio

__all__ = ["PortMapper", "PortMapping", "UPnPPortMapper", "keep_port_mapped"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PortMapping:
    """A forwarded TCP port: others dial ``external_host:external_port``."""

    external_host: str
    external_port: int
    internal_host: str
    internal_port: int
    lease: int  # seconds; renewed at half


class PortMapper(Protocol):
    """A way to ask the router for a forwarded port."""

    async def map(self, internal_host: str, internal_port: int) -> PortMapping | None:
        """Map (or renew) ``internal_port``; None (logged) when it cannot."""
        ...

    async def unmap(self, mapping: PortMapping) -> None:
        """Remove ``mapping`` (best effort, logged; never raises)."""
        ...


class UPnPPortMapper:
    """Maps TCP ports on a UPnP Internet Gateway Device.

    ``root_url`` is the IGD's root description (``http://router:port/rootDesc.xml``); None
    discovers it by SSDP multicast (``discover_ms``). ``lease`` seconds per mapping.
    """

    def __init__(
        self,
        root_url: str | None = None,
        *,
        lease: int = 3600,
        discover_ms: int = 2000,
        timeout: float = 10.0,
        description: str = "swarm",
    ) -> None:
        self.root_url = root_url
        self.lease = lease
        self.discover_ms = discover_ms
        self.timeout = timeout
        self.description = description
        self._upnp: Any = None

    def _igd(self) -> Any:
        if self._upnp is None:
            # optional dependency (untyped): ImportError means no mapping
            upnp = importlib.import_module("miniupnpc").UPnP()
            upnp.discoverdelay = self.discover_ms
            if self.root_url is None:
                upnp.discover()
                upnp.selectigd()
            else:
                upnp.selectigd(self.root_url)
            self._upnp = upnp
        return self._upnp

    def _map(self, internal_host: str, internal_port: int) -> PortMapping:
        upnp = self._igd()
        if internal_host in ("", "0.0.0.0", "::"):  # listening everywhere: our LAN address
            internal_host = str(upnp.lanaddr)
        external = str(upnp.externalipaddress())
        ok = upnp.addportmapping(
            internal_port, "TCP", internal_host, internal_port, self.description, "", self.lease
        )
        if not ok:
            raise OSError("the router refused the port mapping")
        return PortMapping(external, internal_port, internal_host, internal_port, self.lease)

    def _unmap(self, mapping: PortMapping) -> None:
        self._igd().deleteportmapping(mapping.external_port, "TCP")

    async def map(self, internal_host: str, internal_port: int) -> PortMapping | None:
        """Map ``internal_port`` to the same external port; None (logged) when there is no
        library, no router that answers, or the router refuses."""
        with trio.move_on_after(self.timeout):
            try:
                return await trio.to_thread.run_sync(
                    self._map, internal_host, internal_port, abandon_on_cancel=True
                )
            except ImportError:
                log.info("port mapping skipped: the miniupnpc package is not installed")
                return None
            except Exception as exc:  # the library raises bare Exception for every failure
                log.info("port mapping failed: %s", exc)
                return None
        log.info("port mapping: the router did not answer within %s s", self.timeout)
        return None

    async def unmap(self, mapping: PortMapping) -> None:
        """Remove the mapping (best effort, logged)."""
        with trio.move_on_after(self.timeout):
            try:
                await trio.to_thread.run_sync(self._unmap, mapping, abandon_on_cancel=True)
            except Exception as exc:
                log.info("removing the port mapping failed: %s", exc)


async def keep_port_mapped(
    mappers: Sequence[PortMapper],
    internal_host: str,
    internal_port: int,
    *,
    task_status: trio.TaskStatus[PortMapping | None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Map the port with the first of ``mappers`` that can, report the mapping (None: none
    made, and return), renew it through the same mapper at half of each granted lease until
    cancelled, then remove it."""
    mapping, mapper = None, None
    for mapper in mappers:
        mapping = await mapper.map(internal_host, internal_port)
        if mapping is not None:
            break
    task_status.started(mapping)
    if mapping is None or mapper is None:
        return
    log.info(
        "router forwards %s:%s to %s:%s (lease %s s)",
        mapping.external_host, mapping.external_port, internal_host, internal_port, mapping.lease,
    )  # fmt: skip
    try:
        lease = mapping.lease
        while True:
            await trio.sleep(max(lease / 2, 1.0))
            renewed = await mapper.map(internal_host, internal_port)
            if renewed is None:
                log.warning("renewing the port mapping failed (lease %s s)", lease)
                continue
            lease = renewed.lease
            if (renewed.external_host, renewed.external_port) != (
                mapping.external_host, mapping.external_port,
            ):  # fmt: skip
                log.warning(
                    "the router moved the mapping to %s:%s (announced: %s:%s)",
                    renewed.external_host, renewed.external_port,
                    mapping.external_host, mapping.external_port,
                )  # fmt: skip
    finally:
        with trio.CancelScope(shield=True):
            await mapper.unmap(mapping)
