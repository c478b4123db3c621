"""Wire formats of the IPv6 control plane: NDP options and messages, DHCPv6 messages,
ICMPv6 errors, the IPv6 address helpers."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from tests.support.frames import icmpv6
from vhostnet.wire import ndp
from vhostnet.wire.dhcpv6 import Dhcpv6Message, ia_na_value, iaaddr_option, parse_ia_na
from vhostnet.wire.errors import MalformedPacket
from vhostnet.wire.icmpv6 import Icmpv6Message, may_answer_with_error
from vhostnet.wire.ipv6 import (
    IPv6Packet,
    emit_ipv6_header,
    in_prefix,
    multicast_mac,
    solicited_node_address,
)


def ip6(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


SRC, DST = ip6("fe80::1"), ip6("ff02::2")


def view(message: bytes, src: bytes = SRC, dst: bytes = DST) -> Icmpv6Message:
    data = icmpv6(src, dst, message)
    return Icmpv6Message(IPv6Packet(emit_ipv6_header(src, dst, 58, len(data), 255) + data))


def test_address_helpers() -> None:
    assert solicited_node_address(ip6("fec0::5054:ff:fe12:3456")) == ip6("ff02::1:ff12:3456")
    assert multicast_mac(ip6("ff02::1:ff12:3456")) == bytes.fromhex("3333ff123456")
    assert in_prefix(ip6("2001:db8::15"), ip6("2001:db8::"), 64)
    assert not in_prefix(ip6("2001:db9::15"), ip6("2001:db8::"), 64)


def test_options_are_padded_to_eight_bytes_and_read_back() -> None:
    mac = bytes.fromhex("525600000002")
    body = ndp.neighbor_advertisement_body(ip6("fec0::2"), ndp.NA_ROUTER, mac)
    message = ndp.NdpMessage(view(struct.pack("!BBH", 136, 0, 0) + body))
    assert message.target == ip6("fec0::2") and message.flags == ndp.NA_ROUTER
    assert message.link_address(ndp.OPT_TARGET_LINK_ADDRESS) == mac
    assert len(ndp.rdnss_option([ip6("fec0::3")], 60)) == 24
    assert len(ndp.dnssl_option(b"\x07example\x03org\x00", 60)) == 24


@pytest.mark.parametrize(("message", "reason"), [
    (struct.pack("!BBHI", 135, 0, 0, 0) + bytes(8), "short"),  # NS without its whole target
    (struct.pack("!BBHI", 133, 1, 0, 0), "bad_code"),
    (struct.pack("!BBHI", 133, 0, 0, 0) + b"\x01\x00" + bytes(6), "bad_option_length"),
    (struct.pack("!BBHI", 133, 0, 0, 0) + b"\x01\x02" + bytes(6), "bad_option_length"),
    (struct.pack("!BBHI", 133, 0, 0, 0) + b"\x01", "truncated_option"),
    (struct.pack("!BBHI", 128, 0, 0, 0), "not_ndp"),
])
def test_bad_ndp_is_refused(message: bytes, reason: str) -> None:
    with pytest.raises(MalformedPacket) as info:
        ndp.NdpMessage(view(message))
    assert info.value.reason == reason


def test_icmpv6_view_checks_the_checksum() -> None:
    data = bytearray(icmpv6(SRC, DST, struct.pack("!BBHI", 128, 0, 0, 0)))
    data[2] ^= 1
    packet = IPv6Packet(emit_ipv6_header(SRC, DST, 58, len(data)) + bytes(data))
    with pytest.raises(MalformedPacket, match="bad_checksum"):
        Icmpv6Message(packet)


def test_errors_only_for_unicast_non_error_packets() -> None:
    def packet(src: bytes, dst: bytes, next_header: int = 17, payload: bytes = bytes(8)):
        return IPv6Packet(emit_ipv6_header(src, dst, next_header, len(payload)) + payload)
    assert may_answer_with_error(packet(ip6("fec0::15"), ip6("2001:db8::1")))
    assert not may_answer_with_error(packet(bytes(16), ip6("2001:db8::1")))
    assert not may_answer_with_error(packet(ip6("fec0::15"), ip6("ff02::1")))
    assert not may_answer_with_error(packet(ip6("fec0::15"), ip6("2001:db8::1"), 58, b"\x01" + bytes(7)))
    assert may_answer_with_error(packet(ip6("fec0::15"), ip6("2001:db8::1"), 58, b"\x80" + bytes(7)))


def test_dhcpv6_round_trip_and_ia_na() -> None:
    ia = ia_na_value(7, 100, 160, iaaddr_option(ip6("2001:db8::15"), 200, 300))
    message = Dhcpv6Message(7, 0xABCDEF, [(2, b"\0\3\0\1abcdef"), (3, ia)])
    parsed = Dhcpv6Message.parse(message.emit())
    assert parsed == message
    (answer,) = parsed.ia_nas()
    assert (answer.iaid, answer.t1, answer.t2, answer.addresses) == (
        7, 100, 160, [ip6("2001:db8::15")])
    with pytest.raises(MalformedPacket, match="bad_iaaddr"):
        parse_ia_na(ia_na_value(1, 0, 0, b"\x00\x05\x00\x04abcd"))
    with pytest.raises(MalformedPacket, match="bad_duid"):
        Dhcpv6Message.parse(b"\x01\0\0\1" + b"\x00\x01\x00\x01x")
    with pytest.raises(MalformedPacket, match="bad_option_length"):
        Dhcpv6Message.parse(b"\x01\0\0\1" + b"\x00\x08\x00\x01x")
