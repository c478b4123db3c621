"""Fragment emitters (IPv4 and IPv6) and the IPv4 view's fragment fields, checked against
independent parsing with struct."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from tests.support.frames import GATEWAY_IP, GUEST_IP, checksum, ipv4
from vhostnet.wire import ipv6
from vhostnet.wire.errors import MalformedPacket
from vhostnet.wire.ipv4 import IPv4Packet, emit_ipv4_fragments
from vhostnet.wire.ipv6 import IPv6Packet, emit_fragment_header, emit_ipv6_fragments

SRC6 = ipaddress.IPv6Address("fe80::2").packed
DST6 = ipaddress.IPv6Address("fe80::5054:ff:fe12:3456").packed
PAYLOAD = bytes(range(256)) * 16  # 4096 bytes


def test_ipv4_view_reports_fragment_fields_only_when_allowed() -> None:
    data = ipv4(GUEST_IP, GATEWAY_IP, 17, b"12345678", flags_fragment=0x2000 | 185)
    with pytest.raises(MalformedPacket) as info:
        IPv4Packet(data)
    assert info.value.reason == "fragment"
    packet = IPv4Packet(data, allow_fragments=True)
    assert packet.is_fragment and packet.more_fragments and packet.fragment_offset == 1480
    whole = IPv4Packet(ipv4(GUEST_IP, GATEWAY_IP, 17, b"x"), allow_fragments=True)
    assert not whole.is_fragment and whole.fragment_offset == 0


def test_ipv4_datagram_that_fits_is_one_packet_with_df() -> None:
    (packet,) = emit_ipv4_fragments(GATEWAY_IP, GUEST_IP, 17, b"small", 1500, ident=7)
    assert struct.unpack_from("!H", packet, 6)[0] == 0x4000
    assert packet[20:] == b"small"


def test_ipv4_fragments_cover_the_payload_with_aligned_offsets() -> None:
    packets = emit_ipv4_fragments(GATEWAY_IP, GUEST_IP, 17, PAYLOAD, 1500, ident=0x1ABCD, ttl=9)
    assert len(packets) == 3
    rebuilt = b""
    for index, packet in enumerate(packets):
        assert len(packet) <= 1500
        total, ident, flags_fragment, ttl, proto = struct.unpack_from("!2xHHHBB", packet)
        assert total == len(packet) and checksum(packet[:20]) == 0
        assert ident == 0xABCD and ttl == 9 and proto == 17
        assert not flags_fragment & 0x4000, "DF must be clear on fragments"
        assert bool(flags_fragment & 0x2000) == (index < len(packets) - 1)
        assert (flags_fragment & 0x1FFF) * 8 == len(rebuilt)
        if index < len(packets) - 1:
            assert (len(packet) - 20) % 8 == 0
        assert packet[12:16] == GATEWAY_IP and packet[16:20] == GUEST_IP
        rebuilt += packet[20:]
    assert rebuilt == PAYLOAD


def test_ipv4_fragments_refuse_what_cannot_be_sent() -> None:
    with pytest.raises(ValueError):
        emit_ipv4_fragments(GATEWAY_IP, GUEST_IP, 17, bytes(65516), 1500, ident=1)


def test_ipv6_fragment_header_fields() -> None:
    header = emit_fragment_header(17, 1448, True, 0xDEADBEEF)
    assert header == struct.pack("!BBHI", 17, 0, 1448 | 1, 0xDEADBEEF)
    with pytest.raises(ValueError):
        emit_fragment_header(17, 1001, False, 1)


def test_ipv6_datagram_that_fits_is_one_plain_packet() -> None:
    (packet,) = emit_ipv6_fragments(SRC6, DST6, 17, b"small", 1500, ident=3)
    view = IPv6Packet(packet)
    assert view.fragment is None and view.upper_protocol == 17
    assert bytes(view.upper_payload) == b"small"


def test_ipv6_fragments_cover_the_payload_with_aligned_offsets() -> None:
    packets = emit_ipv6_fragments(SRC6, DST6, 17, PAYLOAD, 1500, ident=0x12345678, hop_limit=7)
    assert len(packets) == 3
    rebuilt = b""
    for index, packet in enumerate(packets):
        assert len(packet) <= 1500
        payload_length, next_header, hop_limit = struct.unpack_from("!4xHBB", packet)
        assert payload_length == len(packet) - 40 and next_header == 44 and hop_limit == 7
        upper, offset_flags, ident = struct.unpack_from("!BxHI", packet, 40)
        assert upper == 17 and ident == 0x12345678
        assert offset_flags & 0xFFF8 == len(rebuilt)
        assert bool(offset_flags & 1) == (index < len(packets) - 1)
        if index < len(packets) - 1:
            assert (len(packet) - 48) % 8 == 0
        view = IPv6Packet(packet)
        assert view.fragment == ipv6.Fragment(len(rebuilt), index < len(packets) - 1, ident)
        rebuilt += packet[48:]
    assert rebuilt == PAYLOAD


def test_ipv6_fragments_refuse_what_cannot_be_sent() -> None:
    with pytest.raises(ValueError):
        emit_ipv6_fragments(SRC6, DST6, 17, bytes(65536), 1500, ident=1)
