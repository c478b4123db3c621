"""UDP NAT and the DNS forwarder over IPv6 (sans-IO): flows, replies, ICMPv6 port
unreachable, forwards from IPv6 peers, the shared flow limit, migration records, and the
IPv6 forms of the port specs."""

from __future__ import annotations

import errno
import ipaddress
import struct

import pytest

from tests.support.dns import answer_to, query
from tests.support.frames import (
    GATEWAY_IP,
    GUEST_IP,
    GUEST_IP6,
    guest_udp6_frame,
    guest_udp_frame,
    parse_ipv6_frame,
    parse_udp6_frame,
    parse_udp_frame,
)
from vhostnet.network import build_stack
from vhostnet.option_checks import UsageError, upstream
from vhostnet.stack.config import PortForward, StackConfig, parse_port_spec
from vhostnet.stack.dns import DnsQuery
from vhostnet.stack.stack import NetworkStack
from vhostnet.stack.udp_nat import UdpBindPeer, UdpOpen, UdpSend


def ip6(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


GUEST = GUEST_IP6
GATEWAY6 = ip6("fec0::2")
DNS6 = ip6("fec0::3")
REMOTE = ip6("2001:db8:77::1")


def make_stack(**kwargs) -> NetworkStack:
    return build_stack(StackConfig(udp_idle_timeout=30.0, **kwargs))


def test_outbound_flow_reply_comes_from_the_remote() -> None:
    stack = make_stack()
    nat = stack.udp_nat
    stack.receive_frame(guest_udp6_frame(4000, REMOTE, 9, b"one"), now=0.0)
    stack.receive_frame(guest_udp6_frame(4000, REMOTE, 9, b"two"), now=1.0)
    assert list(nat.commands) == [UdpOpen(1, "2001:db8:77::1", 9), UdpSend(1, b"one"),
                                  UdpSend(1, b"two")]
    nat.on_host_datagram(1, b"pong", now=2.0)
    (frame,) = stack.frames_to_guest
    assert parse_udp6_frame(frame) == (REMOTE, 9, GUEST, 4000, b"pong")
    assert stack.counters()["udp.flows"] == 1


def test_mapped_gateway_goes_to_host_loopback_and_dns_port_to_an_ipv6_upstream() -> None:
    stack = make_stack(dns_upstream=[("127.0.0.1", 53), ("2001:db8::53", 5353)])
    stack.receive_frame(guest_udp6_frame(4000, GATEWAY6, 7, b"x"), now=0.0)
    opens = [c for c in stack.udp_nat.commands if isinstance(c, UdpOpen)]
    assert opens == [UdpOpen(1, "::1", 7)]


@pytest.mark.parametrize("dst", ["fe80::1", "ff02::1", "fec0::99", "::1", "fec0::3"])
def test_destinations_that_never_leave_the_link_are_dropped(dst: str) -> None:
    stack = make_stack()
    stack.receive_frame(guest_udp6_frame(4000, ip6(dst), 9, b"x"), now=0.0)
    assert not stack.udp_nat.commands
    assert stack.counters()["udp6.drop.no_route"] == 1


def test_refused_port_becomes_icmpv6_port_unreachable_quoting_the_datagram() -> None:
    stack = make_stack()
    stack.receive_frame(guest_udp6_frame(4000, REMOTE, 9, b"z" * 2000), now=0.0)
    stack.udp_nat.on_host_error(1, errno.ECONNREFUSED, now=0.5)
    (frame,) = stack.frames_to_guest
    src, dst, next_header, _hops, message = parse_ipv6_frame(frame)
    assert (src, dst, next_header) == (REMOTE, GUEST, 58)
    assert message[:2] == bytes([1, 4])  # destination unreachable, port unreachable
    quoted = message[8:]
    assert quoted[8:24] == GUEST and quoted[24:40] == REMOTE and quoted[6] == 17
    assert struct.unpack_from("!HH", quoted, 40) == (4000, 9)
    assert stack.counters()["udp.port_unreachable"] == 1
    assert stack.counters()["icmp6.error_sent.1.4"] == 1


def test_forward_from_ipv6_peers_reaches_the_guests_ipv6_address() -> None:
    forward = PortForward("0.0.0.0", 5555, 5000, dual_stack=True)
    stack = make_stack(udp_forwards=[forward])
    nat = stack.udp_nat
    nat.on_forward_datagram(forward, "2001:db8::44", 1234, b"early", now=0.0)
    assert stack.counters()["udp6.drop.no_guest_address"] == 1
    stack.receive_frame(guest_udp6_frame(4000, REMOTE, 9, b"hello"), now=0.0)  # the guest's address
    stack.frames_to_guest.clear()
    nat.on_forward_datagram(forward, "2001:db8::44", 1234, b"hi", now=1.0)
    nat.on_forward_datagram(forward, "::1", 1235, b"lo", now=1.0)
    nat.on_forward_datagram(forward, "::ffff:127.0.0.1", 1236, b"v4", now=1.0)
    first, second, third = stack.frames_to_guest
    assert parse_udp6_frame(first) == (ip6("2001:db8::44"), 1234, GUEST, 5000, b"hi")
    assert parse_udp6_frame(second) == (GATEWAY6, 1235, GUEST, 5000, b"lo")
    assert parse_udp_frame(third) == (GATEWAY_IP, 1236, GUEST_IP, 5000, b"v4")
    binds = [c for c in nat.commands if isinstance(c, UdpBindPeer)]
    assert [(c.peer_addr, c.peer_port) for c in binds] == [
        ("2001:db8::44", 1234), ("::1", 1235), ("::ffff:127.0.0.1", 1236)]
    # The guest's reply to the mapped gateway goes back through that forward's peer.
    nat.commands.clear()
    stack.receive_frame(guest_udp6_frame(5000, GATEWAY6, 1235, b"back"), now=2.0)
    assert list(nat.commands) == [UdpSend(binds[1].flow_id, b"back")]


def test_configured_guest_address_serves_forwards_before_the_guest_speaks() -> None:
    forward = PortForward("::", 5555, 5000)
    stack = make_stack(udp_forwards=[forward], guest_ipv6="fec0::15")
    stack.udp_nat.on_forward_datagram(forward, "2001:db8::44", 1234, b"hi", now=0.0)
    assert stack.udp_nat.flow_count() == 1


def test_flow_limit_is_shared_by_dual_stack() -> None:
    stack = make_stack(flow_limit=1)
    stack.receive_frame(guest_udp_frame(4000, GATEWAY_IP, 9, b"v4"), now=0.0)
    stack.receive_frame(guest_udp6_frame(4000, REMOTE, 9, b"v6"), now=0.0)
    assert stack.udp_nat.flow_count() == 1
    assert stack.counters()["udp.drop.flow_limit"] == 1


def test_ipv6_flows_travel_in_migration_records() -> None:
    source = make_stack()
    source.receive_frame(guest_udp6_frame(4000, REMOTE, 9, b"x"), now=0.0)
    records = source.udp_nat.export_flows(now=5.0)
    assert records == [{"guest_ip": "fec0::5054:ff:fe12:3456", "guest_port": 4000,
                         "remote_ip": "2001:db8:77::1", "remote_port": 9, "idle": 5.0}]
    target = make_stack()
    assert target.udp_nat.import_flows(records, now=100.0) == 1
    assert list(target.udp_nat.commands) == [UdpOpen(1, "2001:db8:77::1", 9)]
    mixed = [dict(records[0], remote_ip="192.0.2.1")]
    with pytest.raises(ValueError):
        target.udp_nat.import_flows(mixed, now=100.0)


def test_dns_forwarder_answers_on_the_ipv6_dns_address() -> None:
    stack = make_stack(dns_upstream=[("::1", 5301)])
    stack.receive_frame(guest_udp6_frame(33000, DNS6, 53, query(0x4321)), now=0.0)
    (command,) = stack.dns.commands
    assert isinstance(command, DnsQuery) and (command.host, command.port) == ("::1", 5301)
    stack.dns.on_upstream_reply(0, answer_to(command.data), now=0.1)
    (frame,) = stack.frames_to_guest
    src, sport, dst, dport, payload = parse_udp6_frame(frame)
    assert (src, sport, dst, dport) == (DNS6, 53, GUEST, 33000)
    assert payload[:2] == b"\x43\x21"
    assert not stack.udp_nat.commands  # the service took it before the NAT


def test_dns_servfail_over_ipv6_without_upstreams() -> None:
    stack = make_stack()
    stack.receive_frame(guest_udp6_frame(33000, DNS6, 53, query(7)), now=0.0)
    (frame,) = stack.frames_to_guest
    src, _sport, _dst, _dport, payload = parse_udp6_frame(frame)
    assert src == DNS6 and payload[3] & 0x0F == 2  # RCODE SERVFAIL


@pytest.mark.parametrize("spec, address, both", [
    ("5353", "0.0.0.0", True),
    ("[::1]/5353", "::1", False),
    ("::1/5353", "::1", False),
    ("::/5353", "::", False),
    ("127.0.0.1/5353", "127.0.0.1", False),
    ("[::1]%lo/5353", "::1", False),
])
def test_port_specs_bind_addresses(spec: str, address: str, both: bool) -> None:
    (forward,) = parse_port_spec(spec)
    assert (forward.host_addr, forward.host_port, forward.dual_stack) == (address, 5353, both)


@pytest.mark.parametrize("text, expected", [
    ("::1", ("::1", 53)), ("[::1]:5353", ("::1", 5353)), ("[2001:db8::53]", ("2001:db8::53", 53)),
    ("127.0.0.1:5353", ("127.0.0.1", 5353)),
])
def test_dns_upstreams_of_either_family(text: str, expected: tuple[str, int]) -> None:
    assert upstream(text) == expected


@pytest.mark.parametrize("text", ["[::1]x", "[::1]:", "[::1]:0", "[fec0::zz]:53"])
def test_bad_ipv6_dns_upstreams(text: str) -> None:
    with pytest.raises(UsageError):
        upstream(text)
