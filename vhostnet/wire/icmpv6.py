"""ICMPv6 (RFC 4443): message types, a checked message view, the checksum and emitters.

Unlike ICMPv4, the ICMPv6 checksum covers the IPv6 pseudo-header. Neighbour
discovery messages (RFC 4861) and their options are in ``vhostnet.wire.ndp``;
the engines answering them are ``vhostnet.stack.ndp`` and ``vhostnet.stack.icmp``.
"""

from __future__ import annotations

import struct

from vhostnet.wire.checksum import internet_checksum, ones_complement_sum, pseudo_header_sum_ipv6
from vhostnet.wire.errors import MalformedPacket
from vhostnet.wire.icmp import EchoFields
from vhostnet.wire.ipv6 import NEXT_HEADER_ICMPV6, IPv6Packet, is_multicast

HEADER_LEN = 4  # type, code, checksum; the rest depends on the type
DEST_UNREACHABLE = 1
PACKET_TOO_BIG = 2
TIME_EXCEEDED = 3
PARAMETER_PROBLEM = 4
ECHO_REQUEST = 128
ECHO_REPLY = 129
ROUTER_SOLICITATION = 133
ROUTER_ADVERTISEMENT = 134
NEIGHBOR_SOLICITATION = 135
NEIGHBOR_ADVERTISEMENT = 136
REDIRECT = 137
CODE_NO_ROUTE = 0
CODE_ADDRESS_UNREACHABLE = 3
CODE_PORT_UNREACHABLE = 4
# An error quotes as much of the invoking packet as fits the IPv6 minimum MTU (section 2.4 c).
MIN_MTU = 1280
MAX_QUOTE = MIN_MTU - 40 - 8


def icmpv6_checksum_ok(packet: IPv6Packet) -> bool:
    """True when ``packet`` carries ICMPv6 whose checksum verifies (extension headers allowed)."""
    message = packet.upper_payload
    if packet.upper_protocol != NEXT_HEADER_ICMPV6 or len(message) < HEADER_LEN:
        return False
    initial = pseudo_header_sum_ipv6(packet.src, packet.dst, NEXT_HEADER_ICMPV6, len(message))
    return ones_complement_sum(message, initial) == 0xFFFF


class Icmpv6Message(EchoFields):
    """Checked view of the ICMPv6 message an IPv6 packet carries: at least 8 bytes
    (every type vhostnet reads has a 4-byte field after the checksum), checksum verified.
    ``rest`` is those 4 bytes, ``body`` what follows."""

    __slots__ = ("type", "code", "rest", "body", "data")

    def __init__(self, packet: IPv6Packet) -> None:
        message = packet.upper_payload
        if packet.upper_protocol != NEXT_HEADER_ICMPV6:
            raise MalformedPacket("not_icmpv6", f"next header {packet.upper_protocol}")
        if len(message) < 8:
            raise MalformedPacket("short", f"ICMPv6 message of {len(message)} bytes")
        if not icmpv6_checksum_ok(packet):
            raise MalformedPacket("bad_checksum", "ICMPv6 checksum")
        self.data = message
        self.type: int = message[0]
        self.code: int = message[1]
        self.rest = bytes(message[4:8])
        self.body = message[8:]



def emit_icmpv6(src: bytes, dst: bytes, icmp_type: int, code: int,
                body: bytes | bytearray | memoryview) -> bytes:
    """A complete ICMPv6 message from ``src`` to ``dst``; ``body`` is everything after the checksum."""
    message = bytearray(struct.pack("!BBH", icmp_type, code, 0))
    message += body
    initial = pseudo_header_sum_ipv6(src, dst, NEXT_HEADER_ICMPV6, len(message))
    struct.pack_into("!H", message, 2, internet_checksum(message, initial))
    return bytes(message)


def emit_echo6(src: bytes, dst: bytes, icmp_type: int, ident: int, seq: int,
               payload: bytes | bytearray | memoryview) -> bytes:
    """An echo request or reply (RFC 4443 section 4)."""
    return emit_icmpv6(src, dst, icmp_type, 0, struct.pack("!HH", ident, seq) + bytes(payload))


def may_answer_with_error(invoking: IPv6Packet) -> bool:
    """RFC 4443 section 2.4 (e): no error about an error, nor to a multicast destination
    (Packet Too Big aside, not sent here for multicast), nor to an unspecified or multicast
    source."""
    if invoking.src == bytes(16) or is_multicast(invoking.src) or is_multicast(invoking.dst):
        return False
    if invoking.upper_protocol == NEXT_HEADER_ICMPV6:
        message = invoking.upper_payload
        if len(message) < 1 or message[0] < 128:
            return False
    return True


def emit_error(src: bytes, invoking: IPv6Packet, icmp_type: int, code: int,
               rest: int = 0) -> bytes:
    """An error message from ``src`` to the invoking packet's source, quoting as much of the
    invoking packet (header included) as fits the minimum MTU."""
    quote = bytes(invoking.header) + bytes(invoking.payload)
    return emit_icmpv6(src, invoking.src, icmp_type, code,
                       struct.pack("!I", rest) + quote[:MAX_QUOTE])


def emit_port_unreachable(src: bytes, invoking: IPv6Packet) -> bytes:
    """Destination unreachable, code 4 (port unreachable): a UDP port the host refused."""
    return emit_error(src, invoking, DEST_UNREACHABLE, CODE_PORT_UNREACHABLE)


def emit_packet_too_big(src: bytes, invoking: IPv6Packet, mtu: int) -> bytes:
    """Packet Too Big (RFC 4443 section 3.2): the next hop takes at most ``mtu`` bytes."""
    return emit_error(src, invoking, PACKET_TOO_BIG, 0, mtu)
