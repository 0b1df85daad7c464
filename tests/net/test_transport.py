"""What a remote address counts as (`host_key`): the unit of per-host caps and shares."""

from __future__ import annotations

import pytest

from swarm.net.transport import host_key


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("203.0.113.7", "203.0.113.7"),  # IPv4: the address itself
        ("2a01:4f8:1:2::1", "2a01:4f8:1:2::/64"),  # public IPv6: its /64
        ("2a01:4f8:1:2:ffff:ffff:ffff:fffe", "2a01:4f8:1:2::/64"),
        ("::ffff:198.51.100.9", "198.51.100.9"),  # IPv4-mapped: the IPv4 address
        ("127.0.0.2", "127.0.0.2"),  # loopback: itself (tests play other hosts with it)
        ("::1", "::1"),
        ("fe80::1", "fe80::1"),  # link-local
        ("fd00::5", "fd00::5"),  # unique local (a LAN)
        ("not-an-ip", "not-an-ip"),
    ],
)
def test_host_key(ip: str, key: str) -> None:
    assert host_key(ip) == key


def test_an_ipv6_address_factory_is_one_host() -> None:
    """Every address of a public /64 is one host; the next /64 is another."""
    keys = {host_key(f"2a01:4f8:aa:bb::{i:x}") for i in range(1, 1000)}
    assert keys == {"2a01:4f8:aa:bb::/64"}
    assert host_key("2a01:4f8:aa:bc::1") != host_key("2a01:4f8:aa:bb::1")
