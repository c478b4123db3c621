"""ICMPv6 through the stack: echo (answered locally or forwarded to a ping socket), the error
emitters (port unreachable, packet too big), and the IPv6 dispatch to protocol handlers."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from tests.support.frames import (
    GATEWAY_MAC,
    GUEST_MAC,
    icmp_echo,
    icmpv6,
    ipv6_frame,
    parse_ipv6_frame,
    udp6,
)
from vhostnet.network import build_stack
from vhostnet.stack.config import StackConfig, ip4
from vhostnet.stack.icmp import IcmpEchoSend, IcmpOpen
from vhostnet.wire.icmpv6 import DEST_UNREACHABLE, PACKET_TOO_BIG
from vhostnet.wire.ipv6 import IPv6Packet, link_local_address


def ip6(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


GUEST = ip6("fec0::5054:ff:fe12:3456")
REMOTE = ip6("2001:db8:77::1")


def echo_frame(dst: bytes, seq: int = 1, payload: bytes = b"hello") -> bytes:
    return ipv6_frame(GUEST, dst, icmpv6(GUEST, dst, icmp_echo(128, 0x77, seq, payload)),
                      hop_limit=64, dst_mac=GATEWAY_MAC)


@pytest.mark.parametrize("target", ["fec0::2", "fec0::3", "gateway-link-local"])
def test_echo_to_our_addresses_is_answered_here(target: str) -> None:
    stack = build_stack(StackConfig())
    dst = link_local_address(GATEWAY_MAC) if target == "gateway-link-local" else ip6(target)
    stack.receive_frame(echo_frame(dst, seq=9), now=0.0)
    (frame,) = stack.frames_to_guest
    assert frame[:6] == GUEST_MAC
    src, to, next_header, _, message = parse_ipv6_frame(frame)
    assert (src, to, next_header) == (dst, GUEST, 58)
    assert message[0] == 129 and message[4:] == struct.pack("!HH", 0x77, 9) + b"hello"
    assert stack.counters()["icmp6.echo.local"] == 1


def test_echo_beyond_goes_to_a_ping_socket_and_comes_back() -> None:
    stack = build_stack(StackConfig())
    assert stack.icmp is not None
    stack.receive_frame(echo_frame(REMOTE, seq=1, payload=b"x"), now=0.0)
    stack.receive_frame(echo_frame(REMOTE, seq=2, payload=b"y"), now=0.0)
    assert list(stack.icmp.commands) == [IcmpOpen(1, "2001:db8:77::1"), IcmpEchoSend(1, 1, b"x"),
                                         IcmpEchoSend(1, 2, b"y")]
    # The ping socket hands back the ICMPv6 message with the kernel's identifier.
    stack.icmp.on_echo_reply(1, struct.pack("!BBHHH", 129, 0, 0, 0x9999, 2) + b"y", 0.5)
    (frame,) = stack.frames_to_guest
    src, dst, _, _, message = parse_ipv6_frame(frame)
    assert (src, dst) == (REMOTE, GUEST)
    assert message[0] == 129 and message[4:] == struct.pack("!HH", 0x77, 2) + b"y"


@pytest.mark.parametrize("target", ["ff02::1", "fe80::99", "fec0::1234", "::1"])
def test_echo_to_what_never_leaves_the_link_is_not_forwarded(target: str) -> None:
    stack = build_stack(StackConfig())
    stack.receive_frame(echo_frame(ip6(target)), now=0.0)
    assert not stack.frames_to_guest and stack.icmp is not None and not stack.icmp.commands


def test_mapped_loopback_reaches_the_hosts_loopback() -> None:
    config = StackConfig(map_host_loopback6="fec0::99")
    assert config.host_destination6(ip6("fec0::99"), 80) == ("::1", 80)
    assert config.host_destination6(ip6("fec0::2"), 80) is None
    assert config.host_destination6(REMOTE, 80) == ("2001:db8:77::1", 80)


def test_the_dns_addresses_port_53_go_to_the_first_upstream_of_their_family() -> None:
    """Where the TCP engine connects a guest's DNS over TCP to fec0::3 and to 10.0.2.3."""
    config = StackConfig(dns_upstream=[("127.0.0.53", 53), ("::1", 5353), ("2001:db8::53", 53)])
    assert config.host_destination6(ip6("fec0::3"), 53) == ("::1", 5353)
    assert config.host_destination6(ip6("fec0::3"), 80) is None
    assert config.host_destination(ip4("10.0.2.3"), 53) == ("127.0.0.53", 53)
    ipv6_first = StackConfig(dns_upstream=[("::1", 5353), ("127.0.0.53", 53)])
    assert ipv6_first.host_destination(ip4("10.0.2.3"), 53) == ("127.0.0.53", 53)


def test_dns_over_tcp_falls_back_to_an_upstream_of_the_other_family() -> None:
    """An IPv4-only resolv.conf still serves DNS over TCP through fec0::3 (UDP through it
    reaches any upstream, so a truncated answer's retry over TCP must too), and the other
    way round; no upstream at all: nowhere (the engine answers RST)."""
    assert StackConfig(dns_upstream=[("127.0.0.53", 53)]).host_destination6(
        ip6("fec0::3"), 53) == ("127.0.0.53", 53)
    assert StackConfig(dns_upstream=[("::1", 5353)]).host_destination(
        ip4("10.0.2.3"), 53) == ("::1", 5353)
    assert StackConfig().host_destination6(ip6("fec0::3"), 53) is None
    assert StackConfig().host_destination(ip4("10.0.2.3"), 53) is None


def guest_udp_packet(dst: bytes = REMOTE) -> IPv6Packet:
    frame = ipv6_frame(GUEST, dst, udp6(GUEST, 4000, dst, 9, b"payload"), hop_limit=64,
                       next_header=17, dst_mac=GATEWAY_MAC)
    return IPv6Packet(frame[14:])


@pytest.mark.parametrize(("kind", "code", "rest"), [(DEST_UNREACHABLE, 4, 0),
                                                     (PACKET_TOO_BIG, 0, 1280)])
def test_errors_quote_the_invoking_packet(kind: int, code: int, rest: int) -> None:
    stack = build_stack(StackConfig())
    stack.receive_frame(echo_frame(ip6("fec0::2")), now=0.0)  # the guest's MAC
    stack.frames_to_guest.clear()
    packet = guest_udp_packet()
    assert stack.send_icmpv6_error(packet, kind, code, rest)
    (frame,) = stack.frames_to_guest
    src, dst, _, _, message = parse_ipv6_frame(frame)
    assert (src, dst) == (REMOTE, GUEST)
    assert message[:2] == bytes((kind, code)) and struct.unpack_from("!I", message, 4) == (rest,)
    assert message[8:] == bytes(packet.header) + bytes(packet.payload)


def test_errors_are_never_sent_about_errors_or_multicast() -> None:
    stack = build_stack(StackConfig())
    error = icmpv6(GUEST, REMOTE, struct.pack("!BBHI", 1, 4, 0, 0) + bytes(48))
    frame = ipv6_frame(GUEST, REMOTE, error, hop_limit=64, dst_mac=GATEWAY_MAC)
    assert not stack.send_icmpv6_error(IPv6Packet(frame[14:]), DEST_UNREACHABLE, 4)
    assert not stack.send_icmpv6_error(guest_udp_packet(ip6("ff02::1")), DEST_UNREACHABLE, 4)
    assert not stack.frames_to_guest


class Recorder:
    def __init__(self) -> None:
        self.packets: list[IPv6Packet] = []

    def handle_ipv6(self, packet: IPv6Packet, now: float, checksum_partial: bool = False) -> None:
        self.packets.append(packet)


def test_udp_and_tcp_over_ipv6_reach_registered_handlers() -> None:
    stack = build_stack(StackConfig(udp=False))  # no UDP NAT: nothing handles UDP over IPv6
    udp_frame = ipv6_frame(GUEST, REMOTE, udp6(GUEST, 4000, REMOTE, 9, b"x"), hop_limit=64,
                           next_header=17, dst_mac=GATEWAY_MAC)
    tcp_frame = ipv6_frame(GUEST, REMOTE, bytes(20), hop_limit=64, next_header=6,
                           dst_mac=GATEWAY_MAC)
    stack.receive_frame(udp_frame, 0.0)
    stack.receive_frame(tcp_frame, 0.0)
    counters = stack.counters()
    assert counters["udp6.drop.no_handler"] == 1 and counters["ipv6.drop.proto"] == 1
    udp, tcp = Recorder(), Recorder()
    stack.set_ipv6_protocol_handler(17, udp)
    stack.set_ipv6_protocol_handler(6, tcp)
    stack.receive_frame(udp_frame, 0.0)
    stack.receive_frame(tcp_frame, 0.0)
    assert len(udp.packets) == 1 and udp.packets[0].dst == REMOTE
    assert len(tcp.packets) == 1


def test_udp_over_ipv6_with_a_bad_checksum_is_dropped() -> None:
    stack = build_stack(StackConfig())
    segment = bytearray(udp6(GUEST, 4000, REMOTE, 9, b"x"))
    segment[6] ^= 0xFF
    stack.receive_frame(ipv6_frame(GUEST, REMOTE, bytes(segment), hop_limit=64, next_header=17,
                                   dst_mac=GATEWAY_MAC), 0.0)
    assert stack.counters()["udp6.drop.bad_checksum"] == 1
