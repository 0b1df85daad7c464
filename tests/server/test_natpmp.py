"""NAT-PMP (RFC 6886) against a fake gateway on loopback UDP: the public address and a
mapping are asked for in the RFC's 2- and 12-byte requests, a renewal asks again, a removal
asks for lifetime 0; a refusal, a shorter grant, or no gateway are handled. The renewal
schedule behind every mapper (`keep_port_mapped`) runs under a virtual clock."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from swarm.server.natpmp import NatPmpPortMapper, default_gateway
from swarm.server.portmap import PortMapping, keep_port_mapped
from swarm.testing.natpmp import open_fake_natpmp


async def test_map_renew_and_remove() -> None:
    with trio.fail_after(20):
        async with open_fake_natpmp(external_ip="203.0.113.7") as gateway:
            mapper = NatPmpPortMapper(gateway.address, lease=3600)
            mapping = await mapper.map("0.0.0.0", 40000)
            assert mapping == PortMapping("203.0.113.7", 40000, "127.0.0.1", 40000, 3600)
            assert gateway.requests == [(0, 0, 0, 0), (2, 40000, 40000, 3600)]  # TCP
            assert gateway.mappings == {40000: (40000, 3600)}
            assert await mapper.map("0.0.0.0", 40000) == mapping  # a renewal asks again
            assert gateway.requests[-1] == (2, 40000, 40000, 3600)
            await mapper.unmap(mapping)
            assert gateway.requests[-1] == (2, 40000, 0, 0)  # lifetime 0, external port 0
            assert gateway.mappings == {}


async def test_a_shorter_grant_a_refusal_and_no_gateway() -> None:
    with trio.fail_after(20):
        async with open_fake_natpmp(max_lifetime=60) as gateway:
            mapping = await NatPmpPortMapper(gateway.address).map("127.0.0.1", 40001)
            assert mapping is not None and mapping.lease == 60  # renewed at 30 s then
        async with open_fake_natpmp(result=2) as gateway:  # "not authorized or refused"
            assert await NatPmpPortMapper(gateway.address).map("127.0.0.1", 40001) is None
            assert gateway.mappings == {}
        # nothing listens there any more: refused at once (or given up after the timeout)
        closed = NatPmpPortMapper(gateway.address, timeout=2.0)
        assert await closed.map("127.0.0.1", 40001) is None


def test_the_default_gateway_comes_from_the_routing_table(tmp_path: Path) -> None:
    table = tmp_path / "route"
    table.write_text(
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n"
        "eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\n"
        "eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\n"
    )
    assert default_gateway(table) == "192.0.2.1"
    table.write_text("Iface\tDestination\tGateway \tFlags\n")
    assert default_gateway(table) is None
    assert default_gateway(tmp_path / "missing") is None


class FakeMapper:
    """A router that maps (or not), granting ``leases`` in turn, and records its calls."""

    def __init__(self, leases: list[int] | None) -> None:
        self.leases = leases
        self.calls: list[tuple[str, float]] = []

    async def map(self, internal_host: str, internal_port: int) -> PortMapping | None:
        self.calls.append(("map", trio.current_time()))
        if self.leases is None:
            return None
        lease = self.leases.pop(0) if len(self.leases) > 1 else self.leases[0]
        return PortMapping("198.51.100.1", internal_port, internal_host, internal_port, lease)

    async def unmap(self, mapping: PortMapping) -> None:
        self.calls.append(("unmap", trio.current_time()))


async def test_the_first_mapper_that_maps_is_kept_renewed_and_removed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    upnp, natpmp = FakeMapper(None), FakeMapper([100, 40, 40])
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        mapping = await nursery.start(keep_port_mapped, [upnp, natpmp], "10.0.0.2", 7000)
        assert mapping is not None and mapping.lease == 100
        await trio.sleep(100)  # renewals at 50 s (granted 40 from then), 70 s, 90 s
        nursery.cancel_scope.cancel()
    assert [kind for kind, _ in upnp.calls] == ["map"]  # tried once, never again
    times = [round(at - start) for kind, at in natpmp.calls if kind == "map"]
    assert times == [0, 50, 70, 90]  # renewed at half of each granted lease
    assert natpmp.calls[-1][0] == "unmap"


async def test_no_mapper_maps(autojump_clock: trio.testing.MockClock) -> None:
    none = FakeMapper(None)
    async with trio.open_nursery() as nursery:
        assert await nursery.start(keep_port_mapped, [none, none], "10.0.0.2", 7000) is None
    assert none.calls and all(kind == "map" for kind, _ in none.calls)


@pytest.mark.slow  # the gateway grants 2 s: the renewal comes on the wall clock at 1 s
async def test_a_real_renewal_and_removal_through_the_fake_gateway() -> None:
    with trio.fail_after(20):
        async with open_fake_natpmp(max_lifetime=2) as gateway:
            mapper = NatPmpPortMapper(gateway.address, lease=3600)
            async with trio.open_nursery() as nursery:
                mapping = await nursery.start(keep_port_mapped, [mapper], "127.0.0.1", 40002)
                assert mapping is not None and mapping.lease == 2
                while len([r for r in gateway.requests if r[0] == 2]) < 2:
                    await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
            assert gateway.requests[-1] == (2, 40002, 0, 0) and gateway.mappings == {}


async def test_pcp_map_renew_and_remove() -> None:
    """A gateway that speaks PCP is asked in PCP (60-byte MAP requests, one nonce for the
    mapping's life) and never in NAT-PMP."""
    with trio.fail_after(20):
        async with open_fake_natpmp(external_ip="203.0.113.7", speaks_pcp=True) as gateway:
            mapper = NatPmpPortMapper(gateway.address, lease=3600)
            mapping = await mapper.map("0.0.0.0", 40003)
            assert mapping == PortMapping("203.0.113.7", 40003, "127.0.0.1", 40003, 3600)
            assert gateway.mappings == {40003: (40003, 3600)} and gateway.requests == []
            assert await mapper.map("0.0.0.0", 40003) == mapping  # renewed
            await mapper.unmap(mapping)
            assert gateway.mappings == {}
            lifetimes = [lifetime for _i, _e, lifetime, _n in gateway.pcp]
            assert lifetimes == [3600, 3600, 0]
            assert len({nonce for *_rest, nonce in gateway.pcp}) == 1  # one nonce throughout
        async with open_fake_natpmp(speaks_pcp=True, result=2) as gateway:  # NOT_AUTHORIZED
            assert await NatPmpPortMapper(gateway.address).map("127.0.0.1", 40003) is None
            assert gateway.mappings == {} and len(gateway.pcp) == 1


async def test_a_natpmp_gateway_is_asked_in_natpmp_after_one_pcp_try() -> None:
    with trio.fail_after(20):
        async with open_fake_natpmp() as gateway:  # answers PCP with "unsupported version"
            mapper = NatPmpPortMapper(gateway.address)
            assert await mapper.map("127.0.0.1", 40004) is not None
            assert await mapper.map("127.0.0.1", 40004) is not None
            assert [r[0] for r in gateway.requests] == [0, 2, 0, 2]  # NAT-PMP both times
            assert gateway.pcp == [] and gateway.other_versions == 1  # one PCP try
