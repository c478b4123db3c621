"""Fuzz targets for the wire parsers: each view either parses or raises ``MalformedPacket``.

Any other exception is a crash. A target also reads every field the view offers, so a
lazy field that would fail later fails here.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from vhostnet.wire import arp, dhcp, dns, ethernet, icmp, icmpv6, ipv4, ipv6, tcp, tftp, udp
from vhostnet.wire.checksum import internet_checksum
from vhostnet.wire.errors import MalformedPacket

# Addresses for the checksummed views (the pseudo-header); any would do.
SRC_IP = bytes([10, 0, 2, 15])
DST_IP = bytes([10, 0, 2, 2])


def parses_or_refuses(parse, data: bytes):
    """``parse(data)``, or None when it refused with ``MalformedPacket`` (the contract)."""
    try:
        return parse(data)
    except MalformedPacket as error:
        assert error.reason, "MalformedPacket without a reason"
        return None


def parser(parse) -> Callable[[bytes], None]:
    """A target for any checked view: ``parse(data)`` returns or raises ``MalformedPacket``."""
    return lambda data: parses_or_refuses(parse, data)


def with_ipv4_checksum(data: bytes) -> bytes:
    """``data`` with a correct IPv4 header checksum, so mutations get past that gate."""
    if len(data) < ipv4.MIN_HEADER_LEN:
        return data
    header_len = min(max((data[0] & 0x0F) * 4, ipv4.MIN_HEADER_LEN), len(data))
    header = bytearray(data[:header_len])
    header[10:12] = b"\0\0"
    struct.pack_into("!H", header, 10, internet_checksum(header))
    return bytes(header) + data[header_len:]


def fuzz_ethernet(data: bytes) -> None:
    frame = parses_or_refuses(ethernet.EthernetFrame, data)
    if frame is not None:
        assert len(frame.dst) == 6 and len(frame.src) == 6 and 0 <= frame.ethertype <= 0xFFFF
        assert len(frame.payload) == len(data) - ethernet.HEADER_LEN
        ethernet.is_multicast(frame.dst)


def fuzz_arp(data: bytes) -> None:
    packet = parses_or_refuses(arp.ArpPacket, data)
    if packet is not None:
        reply = arp.arp_reply_frame(packet, bytes(6))
        assert parses_or_refuses(arp.ArpPacket, reply[ethernet.HEADER_LEN:]) is not None


def fuzz_ipv4(data: bytes) -> None:
    # The first byte chooses whether the header checksum is made right first.
    if not data:
        return
    body = with_ipv4_checksum(data[1:]) if data[0] & 1 else data[1:]
    packet = parses_or_refuses(ipv4.IPv4Packet, body)
    if packet is not None:
        assert packet.header_len <= packet.total_length <= len(body)
        assert len(packet.payload) == packet.total_length - packet.header_len
        assert len(packet.src) == 4 and len(packet.dst) == 4


def fuzz_ipv6(data: bytes) -> None:
    packet = parses_or_refuses(ipv6.IPv6Packet, data)
    if packet is not None:
        assert len(packet.payload) == packet.payload_length
        end = 0
        for _kind, offset, length in packet.extensions:
            assert offset == end and length >= 8
            end = offset + length
        assert end + len(packet.upper_payload) == packet.payload_length


def fuzz_icmp(data: bytes) -> None:
    for verify in (True, False):
        message = parses_or_refuses(lambda d, v=verify: icmp.IcmpMessage(d, verify_checksum=v), data)
        if message is not None:
            _ = message.echo_ident, message.echo_seq, bytes(message.body)


def fuzz_icmpv6(data: bytes) -> None:
    packet = parses_or_refuses(ipv6.IPv6Packet, data)
    if packet is not None:
        icmpv6.icmpv6_checksum_ok(packet)


def fuzz_udp(data: bytes) -> None:
    for verify in (True, False):
        datagram = parses_or_refuses(
            lambda d, v=verify: udp.UdpDatagram(SRC_IP, DST_IP, d, verify=v), data)
        if datagram is not None:
            assert len(datagram.payload) == datagram.length - udp.HEADER_LEN


def fuzz_tcp(data: bytes) -> None:
    segment = parses_or_refuses(tcp.TcpSegment.parse, data)
    if segment is not None:
        segment.emit(SRC_IP, DST_IP)
    parses_or_refuses(tcp.parse_options, data[:40])


def fuzz_dhcp(data: bytes) -> None:
    message = parses_or_refuses(dhcp.DhcpMessage.parse, data)
    if message is not None:
        _ = message.message_type
        message.emit()


def fuzz_dns(data: bytes) -> None:
    question = dns.question_section(data)
    if question is not None:
        assert len(question) <= len(data) - dns.HEADER_LEN
    if len(data) >= dns.HEADER_LEN:  # the forwarder checks this before it answers
        dns.servfail_for(data)


_TFTP_PACKETS = {
    tftp.Opcode.RRQ: tftp.Request, tftp.Opcode.WRQ: tftp.Request, tftp.Opcode.DATA: tftp.Data,
    tftp.Opcode.ACK: tftp.Ack, tftp.Opcode.ERROR: tftp.Error, tftp.Opcode.OACK: tftp.OptionAck,
}


def fuzz_tftp(data: bytes) -> None:
    view = parses_or_refuses(tftp.TftpView, data)
    if view is None:
        return
    packet = parses_or_refuses(_TFTP_PACKETS[view.opcode].parse, data)
    if packet is not None:
        packet.emit()
