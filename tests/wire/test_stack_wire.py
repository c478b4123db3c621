"""Checked views and emitters of the stack's wire formats."""

from __future__ import annotations

import struct

import pytest

from tests.support.frames import GATEWAY_IP, GUEST_IP, checksum, icmp_echo, ipv4, udp
from vhostnet.wire import arp, ethernet, icmp
from vhostnet.wire.errors import MalformedPacket
from vhostnet.wire.ipv4 import IPv4Packet, emit_ipv4_header
from vhostnet.wire.udp import UdpDatagram, emit_udp


def reason(factory, *args) -> str:
    with pytest.raises(MalformedPacket) as info:
        factory(*args)
    return info.value.reason


def test_ethernet_view_fields_and_short_frame() -> None:
    frame = ethernet.EthernetFrame(b"\xff" * 6 + b"\x52" * 6 + b"\x08\x06" + b"xyz")
    assert frame.dst == b"\xff" * 6
    assert frame.src == b"\x52" * 6
    assert frame.ethertype == 0x0806
    assert bytes(frame.payload) == b"xyz"
    assert reason(ethernet.EthernetFrame, b"\0" * 13) == "short"


def test_ipv4_view_reads_fields_and_bounds_payload_by_total_length() -> None:
    packet_bytes = ipv4(GUEST_IP, GATEWAY_IP, 17, b"abcdef", ttl=7) + b"\0\0\0"  # Ethernet padding
    packet = IPv4Packet(packet_bytes)
    assert (packet.src, packet.dst, packet.proto, packet.ttl) == (GUEST_IP, GATEWAY_IP, 17, 7)
    assert bytes(packet.payload) == b"abcdef"
    assert packet.header == packet_bytes[:20]


def test_ipv4_view_skips_options() -> None:
    packet = IPv4Packet(ipv4(GUEST_IP, GATEWAY_IP, 17, b"data", ihl=6, options=b"\x01\x01\x01\x00"))
    assert bytes(packet.payload) == b"data"
    assert len(packet.header) == 24


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (ipv4(GUEST_IP, GATEWAY_IP, 17, b"")[:19], "short"),
        (b"\x65" + ipv4(GUEST_IP, GATEWAY_IP, 17, b"x")[1:], "bad_version"),
        (ipv4(GUEST_IP, GATEWAY_IP, 17, b"", ihl=4), "bad_ihl"),
        (ipv4(GUEST_IP, GATEWAY_IP, 17, b"", ihl=15, options=b"\0" * 40)[:40], "bad_ihl"),
        (ipv4(GUEST_IP, GATEWAY_IP, 17, b"abc", total_length=100), "bad_length"),
        (ipv4(GUEST_IP, GATEWAY_IP, 17, b"abc", total_length=10), "bad_length"),
        (ipv4(GUEST_IP, GATEWAY_IP, 17, b"abc", bad_checksum=True), "bad_checksum"),
        (ipv4(GUEST_IP, GATEWAY_IP, 17, b"abc", flags_fragment=0x2000), "fragment"),
        (ipv4(GUEST_IP, GATEWAY_IP, 17, b"abc", flags_fragment=0x0010), "fragment"),
    ],
)
def test_ipv4_view_rejects(data: bytes, expected: str) -> None:
    assert reason(IPv4Packet, data) == expected


def test_emit_ipv4_header_matches_independent_builder() -> None:
    header = emit_ipv4_header(GATEWAY_IP, GUEST_IP, 1, 30, ttl=64)
    assert len(header) == 20
    assert checksum(header) == 0
    version_ihl, _, total, _, flags, ttl, proto = struct.unpack("!BBHHHBB", header[:10])
    assert (version_ihl, total, flags, ttl, proto) == (0x45, 50, 0x4000, 64, 1)
    assert header[12:16] == GATEWAY_IP and header[16:20] == GUEST_IP


def test_udp_view_and_emit() -> None:
    segment = udp(GUEST_IP, 1234, GATEWAY_IP, 53, b"query")
    datagram = UdpDatagram(GUEST_IP, GATEWAY_IP, segment + b"pad")
    assert (datagram.src_port, datagram.dst_port, bytes(datagram.payload)) == (1234, 53, b"query")
    assert emit_udp(GUEST_IP, 1234, GATEWAY_IP, 53, b"query") == segment


def test_udp_view_rejects_bad_input() -> None:
    segment = udp(GUEST_IP, 1234, GATEWAY_IP, 53, b"query")
    assert reason(UdpDatagram, GUEST_IP, GATEWAY_IP, segment[:7]) == "short"
    too_long = segment[:4] + struct.pack("!H", 200) + segment[6:]
    assert reason(UdpDatagram, GUEST_IP, GATEWAY_IP, too_long) == "bad_length"
    corrupted = segment[:-1] + b"X"
    assert reason(UdpDatagram, GUEST_IP, GATEWAY_IP, corrupted) == "bad_checksum"
    no_checksum = segment[:6] + b"\0\0" + segment[8:-1] + b"X"
    assert bytes(UdpDatagram(GUEST_IP, GATEWAY_IP, no_checksum).payload) == b"querX"


def test_arp_view_and_reply() -> None:
    request = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, b"\x02" * 6, GUEST_IP,
                          b"\0" * 6, GATEWAY_IP)
    packet = arp.ArpPacket(request)
    assert (packet.op, packet.sender_ip, packet.target_ip) == (1, GUEST_IP, GATEWAY_IP)
    assert reason(arp.ArpPacket, request[:27]) == "short"
    assert reason(arp.ArpPacket, b"\x00\x06" + request[2:]) == "unsupported"


def test_rarp_frame_layout() -> None:
    mac = bytes.fromhex("525400abcdef")
    frame = arp.rarp_frame(mac)
    expected = (b"\xff" * 6 + mac + b"\x80\x35"
                + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 3) + mac + b"\0" * 4 + mac + b"\0" * 4)
    assert frame == expected


def test_icmp_view_and_builders() -> None:
    message = icmp.IcmpMessage(icmp_echo(8, 0x1234, 7, b"ping"))
    assert (message.type, message.echo_ident, message.echo_seq) == (8, 0x1234, 7)
    assert bytes(message.body) == b"ping"
    assert icmp.emit_echo(0, 0x1234, 7, b"ping") == icmp_echo(0, 0x1234, 7, b"ping")
    assert reason(icmp.IcmpMessage, b"\x08\0\0\0\0\0\0") == "short"
    assert reason(icmp.IcmpMessage, icmp_echo(8, 1, 1, b"x")[:-1] + b"y") == "bad_checksum"


def test_port_unreachable_quotes_header_and_eight_bytes() -> None:
    header = ipv4(GUEST_IP, GATEWAY_IP, 17, b"")[:20]
    message = icmp.emit_port_unreachable(header, b"0123456789abc")
    assert message[:2] == b"\x03\x03"
    assert message[4:8] == b"\0\0\0\0"
    assert message[8:] == header + b"01234567"
    assert checksum(message) == 0
