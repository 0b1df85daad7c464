"""Port mapping on the home router: UPnP IGD through the `miniupnpc` library (no SSDP or
SOAP written here). A server that finds itself unreachable asks its router to forward its
RPC port (`keep_port_mapped`), renews the lease at half its life, and removes the mapping
when it stops; the reachability check then dials the mapped public address back
(`swarm.server.reachability`).

`miniupnpc` is an optional dependency (``pip install 'swarm[nat]'``); without it, or without
a router that answers, mapping is skipped (logged) and relays take over. Its calls block, so
they run in a worker thread, each within ``timeout``. NAT-PMP / PCP are not tried (no
maintained Python library for them was found; see benchmarks/README.md).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any

import trio

__all__ = ["PortMapping", "UPnPPortMapper", "keep_port_mapped"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PortMapping:
    """A forwarded TCP port: others dial ``external_host:external_port``."""

    external_host: str
    external_port: int
    internal_host: str
    internal_port: int
    lease: int  # seconds; renewed at half


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
    mapper: UPnPPortMapper,
    internal_host: str,
    internal_port: int,
    *,
    task_status: trio.TaskStatus[PortMapping | None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Map the port, report the mapping (None: none made, and return), renew it every half
    lease until cancelled, then remove it."""
    mapping = await mapper.map(internal_host, internal_port)
    task_status.started(mapping)
    if mapping is None:
        return
    log.info(
        "router forwards %s:%s to %s:%s (lease %s s)",
        mapping.external_host, mapping.external_port, internal_host, internal_port, mapping.lease,
    )  # fmt: skip
    try:
        while True:
            await trio.sleep(mapping.lease / 2)
            renewed = await mapper.map(internal_host, internal_port)
            if renewed is None:
                log.warning("renewing the port mapping failed (lease %s s)", mapping.lease)
    finally:
        with trio.CancelScope(shield=True):
            await mapper.unmap(mapping)
