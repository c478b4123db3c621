"""StackConfig validation, host_destination, and passt-style port specs."""

from __future__ import annotations

import pytest

from vhostnet.stack.config import (
    DEFAULT_EPHEMERAL,
    PortForward,
    StackConfig,
    ip4,
    ip4_str,
    parse_port_spec,
)


def test_defaults_match_qemu_user_networking() -> None:
    config = StackConfig()
    assert ip4_str(config.guest_ipv4) == "10.0.2.15"
    assert ip4_str(config.gateway) == "10.0.2.2"
    assert ip4_str(config.dns) == "10.0.2.3"
    assert config.prefix_length == 24
    assert config.mtu == 1500
    assert config.gateway_mac[0] & 0x02  # locally administered


def test_strings_are_converted_and_validated() -> None:
    config = StackConfig(guest_ipv4="192.168.7.10", gateway="192.168.7.1", dns="192.168.7.1",
                         gateway_mac="02:00:00:00:00:01")
    assert config.guest_ipv4 == bytes([192, 168, 7, 10])
    assert config.gateway_mac == bytes.fromhex("020000000001")


@pytest.mark.parametrize(
    "kwargs",
    [{"mtu": 575}, {"mtu": 65521}, {"netmask": "255.0.255.0"}, {"gateway": "10.0.2.15"},
     {"guest_ipv4": "10.0.2"}, {"gateway_mac": "01:00:00:00:00:01"}, {"lease_time": 0}],
)
def test_bad_config_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        StackConfig(**kwargs)


def test_mtu_bounds_accepted() -> None:
    assert StackConfig(mtu=576).mtu == 576
    assert StackConfig(mtu=65520).mtu == 65520


def test_host_destination() -> None:
    config = StackConfig(dns_upstream=[("127.0.0.53", 5353), ("127.0.0.54", 53)])
    assert config.host_destination(ip4("10.0.2.2"), 8080) == ("127.0.0.1", 8080)
    assert config.host_destination(ip4("10.0.2.3"), 53) == ("127.0.0.53", 5353)
    assert config.host_destination(ip4("10.0.2.3"), 80) is None
    assert config.host_destination(ip4("192.0.2.7"), 9) == ("192.0.2.7", 9)
    for unreachable in ("127.0.0.1", "0.0.0.0", "255.255.255.255", "224.0.0.251", "10.0.2.255"):
        assert config.host_destination(ip4(unreachable), 9) is None
    no_loopback = StackConfig(map_host_loopback=None)
    assert no_loopback.host_destination(ip4("10.0.2.2"), 8080) is None
    assert no_loopback.host_destination(ip4("10.0.2.3"), 53) is None  # no upstream configured
    assert no_loopback.loopback_peer_address == ip4("10.0.2.2")


def test_map_host_loopback_to_another_address() -> None:
    # passt's --map-host-loopback ADDR: ADDR reaches the host's loopback and the
    # (virtual) gateway then leads nowhere; loopback peers appear as ADDR.
    config = StackConfig(map_host_loopback="10.0.2.100")
    assert config.host_destination(ip4("10.0.2.100"), 8080) == ("127.0.0.1", 8080)
    assert config.host_destination(ip4("10.0.2.2"), 8080) is None
    assert config.loopback_peer_address == ip4("10.0.2.100")
    assert StackConfig(gateway="10.0.2.1").host_destination(ip4("10.0.2.1"), 80) == ("127.0.0.1", 80)
    for clash in ("10.0.2.15", "10.0.2.3"):
        with pytest.raises(ValueError, match="loopback"):
            StackConfig(map_host_loopback=clash)


def test_in_guest_subnet() -> None:
    config = StackConfig()
    assert config.in_guest_subnet(ip4("10.0.2.200"))
    assert not config.in_guest_subnet(ip4("10.0.3.1"))


def pairs(spec: str) -> list[tuple[str, int, int]]:
    return [(f.host_addr, f.host_port, f.guest_port) for f in parse_port_spec(spec)]


def test_port_spec_single_and_mapping() -> None:
    assert parse_port_spec("22") == [PortForward("0.0.0.0", 22, 22, dual_stack=True)]
    assert pairs("2222:22") == [("0.0.0.0", 2222, 22)]
    assert pairs("80,2222:22") == [("0.0.0.0", 80, 80), ("0.0.0.0", 2222, 22)]


def test_port_spec_ranges() -> None:
    assert [p[1:] for p in pairs("5000-5002")] == [(5000, 5000), (5001, 5001), (5002, 5002)]
    assert [p[1:] for p in pairs("5000-5002:6000-6002")] == [(5000, 6000), (5001, 6001),
                                                           (5002, 6002)]


def test_port_spec_address() -> None:
    assert pairs("127.0.0.1/8080:80") == [("127.0.0.1", 8080, 80)]
    assert pairs("::1/22") == [("::1", 22, 22)]
    assert pairs("[::1]/22") == [("::1", 22, 22)]
    # No address: both families (one dual-stack listener); an address: that one only.
    assert [f.dual_stack for f in parse_port_spec("22")] == [True]
    assert [f.dual_stack for f in parse_port_spec("0.0.0.0/22")] == [False]
    assert [f.dual_stack for f in parse_port_spec("::1/22")] == [False]


def test_port_spec_exclusions_and_all() -> None:
    assert [p[1] for p in pairs("1000-1005,~1002-1003")] == [1000, 1001, 1004, 1005]
    # passt's `all`: every port outside the ephemeral range, skipped where in use.
    outside = 65535 - len(DEFAULT_EPHEMERAL)
    everything_but = pairs("~22")
    assert len(everything_but) == outside - 1 and ("0.0.0.0", 22, 22) not in everything_but
    assert len(pairs("all")) == outside
    assert all(f.optional for f in parse_port_spec("all"))
    assert 32768 not in {p[1] for p in pairs("all")}
    assert len(pairs("all,~1-1023")) == outside - 1023
    assert len(parse_port_spec("all", ephemeral=range(0))) == 65535
    assert parse_port_spec("none") == []


def test_port_spec_interface_and_guest_address() -> None:
    assert parse_port_spec("%lo/22") == [PortForward("0.0.0.0", 22, 22, host_if="lo",
                                                     dual_stack=True)]
    assert parse_port_spec("127.0.0.1%lo/22") == [PortForward("127.0.0.1", 22, 22, host_if="lo")]
    assert parse_port_spec("8080:10.0.2.15/80") == [
        PortForward("0.0.0.0", 8080, 80, guest_addr="10.0.2.15", dual_stack=True)]
    assert {f.guest_addr for f in parse_port_spec("all:10.0.2.15")} == {"10.0.2.15"}
    # Named ports must bind; ports from `all` may be taken by the host.
    assert {f.host_port: f.optional for f in parse_port_spec("80,all")}[80] is False


@pytest.mark.parametrize(
    "spec",
    ["", "0", "65536", "abc", "22-", "30-20", "1000-1002:2000-2005", "999.1.1.1/22", "22,,23",
     "80:81,80:82", "~", "22:", "%/22", "all:nothing"],
)
def test_port_spec_errors_are_one_sentence(spec: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_port_spec(spec)
    message = str(info.value)
    assert message and "\n" not in message
