"""The IPv6 options of the command line: a second -a/-g/-D, --map-host-loopback per family,
-4/-6, --no-ndp/--no-ra/--no-dhcpv6."""

from __future__ import annotations

import ipaddress

import pytest

from vhostnet import options as cli_options
from vhostnet.cli import FD_RESERVE, flow_limit_for


def config(*options: str):
    args = cli_options.build_parser().parse_args(["--socket", "/tmp/x.sock", "--dns-upstream",
                                                  "127.0.0.1", *options])
    stack_config, _warnings = cli_options.config_from_args(args, 4096, FD_RESERVE, flow_limit_for)
    return stack_config


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def test_defaults_are_qemus_user_networking() -> None:
    c = config()
    assert c.guest_ipv4 == ip("10.0.2.15") and c.guest_ipv6 is None
    assert (c.prefix6, c.prefix6_len) == (ip("fec0::"), 64)
    assert (c.gateway6, c.dns6, c.map_host_loopback6) == (ip("fec0::2"), ip("fec0::3"),
                                                          ip("fec0::2"))
    assert c.ipv4 and c.ipv6 and c.ndp and c.ra and c.dhcpv6


def test_a_plan_for_each_family() -> None:
    c = config("-a", "10.1.0.15/16", "-a", "2001:db8:1::15", "-g", "10.1.0.1",
               "-g", "2001:db8:1::2", "--map-host-loopback", "2001:db8:1::2",
               "--dns-forward", "2001:db8:1::3", "--dns-forward", "10.1.0.3")
    assert (c.guest_ipv4, c.netmask, c.gateway, c.dns) == (
        ip("10.1.0.15"), ip("255.255.0.0"), ip("10.1.0.1"), ip("10.1.0.3"))
    assert c.guest_ipv6 == ip("2001:db8:1::15") and c.prefix6 == ip("2001:db8:1::")
    assert (c.gateway6, c.dns6, c.map_host_loopback6) == (
        ip("2001:db8:1::2"), ip("2001:db8:1::3"), ip("2001:db8:1::2"))
    assert c.map_host_loopback == ip("10.1.0.1")
    # Without -D, RA and DHCPv6 offer the forwarder's address, as DHCPv4 does.
    assert c.offered_dns6 == [ip("2001:db8:1::3")] and c.offered_dns == [ip("10.1.0.3")]


def test_dns_servers_offered_per_family_as_passt() -> None:
    c = config("-D", "2001:db8::53", "-D", "192.0.2.53")
    assert c.offered_dns6 == [ip("2001:db8::53")] and c.offered_dns == [ip("192.0.2.53")]
    assert c.dns6 == ip("fec0::3")  # the forwarder stays where it is
    c = config("-D", "none")
    assert c.offered_dns6 == [] and c.offered_dns == []


def test_switches() -> None:
    assert not config("-4").ipv6 and not config("-6").ipv4
    c = config("--no-ndp", "--no-ra", "--no-dhcpv6", "--map-host-loopback", "none")
    assert not (c.ndp or c.ra or c.dhcpv6)
    assert c.map_host_loopback is None and c.map_host_loopback6 is None


@pytest.mark.parametrize("options", [
    ("-4", "-6"),
    ("-a", "2001:db8::1", "-a", "2001:db8::2"),
    ("-a", "fec0::x"),
    ("-g", "fec0::2/64"),
    ("-a", "2001:db8::1/129"),
    ("-g", "fec0::15", "-a", "fec0::15"),
])
def test_mistakes_are_one_sentence(options: tuple[str, ...]) -> None:
    with pytest.raises(cli_options.UsageError):
        config(*options)
