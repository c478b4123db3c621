"""IPv6 wire format: header view and emitter, extension headers, pseudo-header, ICMPv6."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from tests.support.frames import checksum as plain_checksum
from vhostnet.wire import ipv6
from vhostnet.wire.checksum import internet_checksum, pseudo_header_sum_ipv6
from vhostnet.wire.errors import MalformedPacket
from vhostnet.wire.icmpv6 import emit_icmpv6, icmpv6_checksum_ok
from vhostnet.wire.ipv6 import Fragment, IPv6Packet, emit_ipv6_header

SRC = ipaddress.IPv6Address("fe80::5054:ff:fe12:3456").packed
DST = ipaddress.IPv6Address("2001:db8::1").packed


def packet(next_header: int, payload: bytes, hop_limit: int = 64) -> bytes:
    return emit_ipv6_header(SRC, DST, next_header, len(payload), hop_limit) + payload


def options_header(next_header: int, units: int = 0) -> bytes:
    """Hop-by-hop / destination options (or routing) header of (units + 1) * 8 bytes, PadN."""
    length = (units + 1) * 8
    return bytes((next_header, units, 1, length - 4)) + bytes(length - 4)


def fragment_header(next_header: int, offset: int, more: bool, ident: int) -> bytes:
    return struct.pack("!BxHI", next_header, offset | int(more), ident)


def reason(data: bytes) -> str:
    with pytest.raises(MalformedPacket) as info:
        IPv6Packet(data)
    return info.value.reason


def test_emit_then_parse_round_trip() -> None:
    header = emit_ipv6_header(SRC, DST, ipv6.NEXT_HEADER_UDP, 5, hop_limit=7, traffic_class=0xB8,
                              flow_label=0xABCDE)
    assert len(header) == ipv6.HEADER_LEN and header[0] >> 4 == 6
    view = IPv6Packet(header + b"hello" + b"\0\0\0")  # Ethernet padding beyond the length
    assert (view.src, view.dst, view.hop_limit) == (SRC, DST, 7)
    assert (view.traffic_class, view.flow_label, view.payload_length) == (0xB8, 0xABCDE, 5)
    assert view.next_header == view.upper_protocol == ipv6.NEXT_HEADER_UDP
    assert bytes(view.payload) == bytes(view.upper_payload) == b"hello"
    assert view.extensions == () and view.fragment is None


def test_emit_refuses_what_does_not_fit() -> None:
    with pytest.raises(ValueError):
        emit_ipv6_header(SRC, DST, 17, 0x10000)
    with pytest.raises(ValueError):
        emit_ipv6_header(SRC[:4], DST, 17, 0)


def test_extension_headers_are_walked_to_the_upper_layer() -> None:
    payload = (options_header(ipv6.NEXT_HEADER_ROUTING)
               + options_header(ipv6.NEXT_HEADER_DESTINATION_OPTIONS, units=1)
               + options_header(ipv6.NEXT_HEADER_ICMPV6) + b"icmp")
    view = IPv6Packet(packet(ipv6.NEXT_HEADER_HOP_BY_HOP, payload))
    assert view.next_header == ipv6.NEXT_HEADER_HOP_BY_HOP
    assert view.extensions == ((0, 0, 8), (43, 8, 16), (60, 24, 8))
    assert view.upper_protocol == ipv6.NEXT_HEADER_ICMPV6
    assert bytes(view.upper_payload) == b"icmp"


def test_fragments_are_reported() -> None:
    first = IPv6Packet(packet(ipv6.NEXT_HEADER_FRAGMENT,
                              fragment_header(ipv6.NEXT_HEADER_UDP, 0, True, 77) + b"udp..."))
    assert first.fragment == Fragment(0, True, 77)
    assert first.upper_protocol == ipv6.NEXT_HEADER_UDP and bytes(first.upper_payload) == b"udp..."
    # A later fragment carries payload bytes only, even where they look like a header.
    later = IPv6Packet(packet(ipv6.NEXT_HEADER_FRAGMENT,
                              fragment_header(ipv6.NEXT_HEADER_HOP_BY_HOP, 1480, False, 77)
                              + b"\0\xff" + bytes(6)))
    assert later.fragment == Fragment(1480, False, 77)
    assert later.upper_protocol == ipv6.NEXT_HEADER_HOP_BY_HOP and len(later.upper_payload) == 8


def test_no_next_header_ends_the_walk() -> None:
    view = IPv6Packet(packet(ipv6.NEXT_HEADER_DESTINATION_OPTIONS,
                             options_header(ipv6.NEXT_HEADER_NONE)))
    assert view.upper_protocol == ipv6.NEXT_HEADER_NONE and len(view.upper_payload) == 0


@pytest.mark.parametrize(("data", "expected"), [
    (packet(17, b"")[:39], "short"),
    (b"\x45" + packet(17, b"")[1:], "bad_version"),
    (packet(17, b"abcd")[:-1], "bad_length"),
    (packet(ipv6.NEXT_HEADER_HOP_BY_HOP, bytes(4)), "truncated_extension"),
    (packet(ipv6.NEXT_HEADER_ROUTING, options_header(17, units=2)[:16]), "truncated_extension"),
    (packet(ipv6.NEXT_HEADER_DESTINATION_OPTIONS, options_header(ipv6.NEXT_HEADER_HOP_BY_HOP)
            + options_header(17)), "misplaced_hop_by_hop"),
    (packet(ipv6.NEXT_HEADER_FRAGMENT, fragment_header(ipv6.NEXT_HEADER_FRAGMENT, 0, True, 1)
            + fragment_header(17, 0, True, 1)), "repeated_fragment"),
])
def test_malformed_packets_raise_distinct_reasons(data: bytes, expected: str) -> None:
    assert reason(data) == expected


def test_pseudo_header_sum_matches_rfc_8200_layout() -> None:
    segment = b"\x11\x22\x33"
    pseudo = SRC + DST + struct.pack("!I3xB", 70000, 58)
    assert (internet_checksum(segment, pseudo_header_sum_ipv6(SRC, DST, 58, 70000))
            == plain_checksum(pseudo + segment))


def test_icmpv6_emit_then_verify() -> None:
    message = emit_icmpv6(SRC, DST, 128, 0, b"\x00\x01\x00\x02ping")
    assert message[:2] == b"\x80\x00"
    assert plain_checksum(SRC + DST + struct.pack("!I3xB", len(message), 58) + message) == 0
    assert icmpv6_checksum_ok(IPv6Packet(packet(ipv6.NEXT_HEADER_ICMPV6, message)))
    behind_options = options_header(ipv6.NEXT_HEADER_ICMPV6) + message
    assert icmpv6_checksum_ok(IPv6Packet(packet(ipv6.NEXT_HEADER_DESTINATION_OPTIONS, behind_options)))
    corrupted = message[:-1] + b"x"
    assert not icmpv6_checksum_ok(IPv6Packet(packet(ipv6.NEXT_HEADER_ICMPV6, corrupted)))
    assert not icmpv6_checksum_ok(IPv6Packet(packet(ipv6.NEXT_HEADER_UDP, message)))
