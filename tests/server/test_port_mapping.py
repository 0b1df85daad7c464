"""Port mapping through `miniupnpc` against a fake UPnP IGD on loopback, and by NAT-PMP
against a fake gateway on loopback UDP: a server that announces an address where nothing
listens maps its port, is found reachable at the mapped address (and announces it, with no
relays), renews the lease at half its life, and removes the mapping when it stops. With
port mapping off (``--no-port-mapping``) the router is never asked."""

from __future__ import annotations

import importlib.util
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio

from swarm.server import reachability
from swarm.server.reachability import ReachabilityConfig
from swarm.testing.checkpoints import make_tiny_checkpoint
from swarm.testing.igd import open_fake_igd
from swarm.testing.natpmp import open_fake_natpmp
from swarm.testing.reach import open_relay_node
from swarm.testing.swarm import open_local_swarm
from swarm.types import LayerRange, Reachability

needs_miniupnpc = pytest.mark.skipif(
    importlib.util.find_spec("miniupnpc") is None, reason="the nat extra is not installed"
)
NO_IGD = "http://127.0.0.1:1/rootDesc.xml"  # UPnP fails at once: nothing listens there


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("portmap") / "tiny", num_layers=2)


@needs_miniupnpc
async def test_mapping_renewal_and_removal(model: Path) -> None:
    with trio.fail_after(120):
        async with (
            open_fake_igd(external_ip="127.0.0.1") as igd,
            open_local_swarm(model) as local,
            AsyncExitStack() as stack,
        ):
            for _ in range(2):
                await stack.enter_async_context(open_relay_node(local.dht_address))
            reach = ReachabilityConfig(
                check_timeout=5.0, offer_relay=False, igd_url=igd.root_url, mapping_lease=2
            )
            # listens on 127.0.0.1, announces 127.0.0.9 where nothing listens
            server = await local.add_server(
                LayerRange(0, 2), reachability=reach, public_host="127.0.0.9"
            )
            ready = server.ready
            assert ready.reachability == Reachability.REACHABLE and ready.relays == ()
            assert (ready.host, ready.port) == ("127.0.0.1", ready.port)  # the mapped address
            assert igd.mappings == {(ready.port, "TCP"): ("127.0.0.1", ready.port, 2)}
            adds = igd.actions.count("AddPortMapping")
            with trio.fail_after(10):  # renewed at half the 2 s lease
                while igd.actions.count("AddPortMapping") < adds + 1:
                    await trio.sleep(0.05)
            await local.stop(0)
            assert igd.mappings == {}
            assert "DeletePortMapping" in igd.actions


@needs_miniupnpc
async def test_no_mapping_when_it_does_not_help(model: Path) -> None:
    """A mapped address that does not answer either: the mapping is removed at once and the
    server goes through relays."""
    with trio.fail_after(120):
        async with (
            open_fake_igd(external_ip="127.0.0.9") as igd,  # nothing listens there either
            open_local_swarm(model) as local,
            AsyncExitStack() as stack,
        ):
            for _ in range(2):
                await stack.enter_async_context(open_relay_node(local.dht_address))
            reach = ReachabilityConfig(check_timeout=5.0, offer_relay=False, igd_url=igd.root_url)
            server = await local.add_server(
                LayerRange(0, 2), reachability=reach, public_host="127.0.0.9"
            )
            assert server.ready.reachability == Reachability.UNREACHABLE
            assert len(server.ready.relays) == 2
            assert igd.mappings == {} and "DeletePortMapping" in igd.actions


@pytest.mark.slow  # the gateway grants 2 s: the renewal comes on the wall clock
async def test_natpmp_mapping_renewal_and_removal(model: Path) -> None:
    """No UPnP router answers; the NAT-PMP gateway maps the port."""
    with trio.fail_after(120):
        async with (
            open_fake_natpmp(external_ip="127.0.0.1", max_lifetime=2) as gateway,
            open_local_swarm(model) as local,
            AsyncExitStack() as stack,
        ):
            for _ in range(2):
                await stack.enter_async_context(open_relay_node(local.dht_address))
            reach = ReachabilityConfig(
                check_timeout=5.0, offer_relay=False, igd_url=NO_IGD,
                natpmp_gateway=gateway.address,
            )  # fmt: skip
            server = await local.add_server(
                LayerRange(0, 2), reachability=reach, public_host="127.0.0.9"
            )
            ready = server.ready
            assert ready.reachability == Reachability.REACHABLE and ready.relays == ()
            assert (ready.host, ready.port) == ("127.0.0.1", ready.port)  # the mapped address
            assert gateway.mappings == {ready.port: (ready.port, 2)}
            with trio.fail_after(10):  # renewed at half the 2 s lease
                while [r[0] for r in gateway.requests].count(2) < 2:
                    await trio.sleep(0.05)
            await local.stop(0)
            assert gateway.mappings == {}
            assert gateway.requests[-1] == (2, ready.port, 0, 0)


async def test_no_port_mapping_asks_no_router(model: Path) -> None:
    with trio.fail_after(120):
        async with (
            open_fake_natpmp(external_ip="127.0.0.1") as gateway,
            open_local_swarm(model) as local,
            AsyncExitStack() as stack,
        ):
            for _ in range(2):
                await stack.enter_async_context(open_relay_node(local.dht_address))
            reach = ReachabilityConfig(
                check_timeout=5.0, offer_relay=False, port_mapping=False,
                natpmp_gateway=gateway.address,
            )  # fmt: skip
            server = await local.add_server(
                LayerRange(0, 2), reachability=reach, public_host="127.0.0.9"
            )
            assert server.ready.reachability == Reachability.UNREACHABLE
            assert len(server.ready.relays) == 2
            assert gateway.requests == []


@pytest.mark.parametrize(("host", "looks"), [("127.0.0.1", False), ("0.0.0.0", True)])
async def test_a_server_on_loopback_looks_for_no_router(
    model: Path, monkeypatch: pytest.MonkeyPatch, host: str, looks: bool
) -> None:
    """No router forwards to loopback: a server listening there discovers none (SSDP took 8 s
    of every such start), one listening on every address does. Both announce an address
    that no helper can dial (198.51.100.1, a documentation range), so neither is reachable."""
    made: list[str] = []

    class Recording:
        def __init__(self, where: str | None, *, lease: int) -> None:
            made.append(f"{where}")

        async def map(self, internal_host: str, internal_port: int) -> None:
            return None

        async def unmap(self, mapping: object) -> None:
            return None

    monkeypatch.setattr(reachability, "UPnPPortMapper", Recording)
    monkeypatch.setattr(reachability, "NatPmpPortMapper", Recording)
    with trio.fail_after(120):
        async with (
            open_local_swarm(model) as local,
            AsyncExitStack() as stack,
        ):
            for _ in range(2):
                await stack.enter_async_context(open_relay_node(local.dht_address))
            reach = ReachabilityConfig(check_timeout=1.0, offer_relay=False)
            server = await local.add_server(
                LayerRange(0, 2), reachability=reach, host=host, public_host="198.51.100.1"
            )
            assert server.ready.reachability != Reachability.REACHABLE
    assert made == (["None", "None"] if looks else [])
