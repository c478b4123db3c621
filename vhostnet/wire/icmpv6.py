"""ICMPv6 (RFC 4443): message types vhostnet uses, the checksum check, and an emitter.

Unlike ICMPv4, the ICMPv6 checksum covers the IPv6 pseudo-header. The one
ICMPv6 exchange vhostnet answers (Router Solicitation) is in ``vhostnet.stack.ndp``.
"""

from __future__ import annotations

import struct

from vhostnet.wire.checksum import internet_checksum, ones_complement_sum, pseudo_header_sum_ipv6
from vhostnet.wire.ipv6 import NEXT_HEADER_ICMPV6, IPv6Packet

HEADER_LEN = 4  # type, code, checksum; the rest depends on the type
ROUTER_SOLICITATION = 133
ROUTER_ADVERTISEMENT = 134


def icmpv6_checksum_ok(packet: IPv6Packet) -> bool:
    """True when ``packet`` carries ICMPv6 whose checksum verifies (extension headers allowed)."""
    message = packet.upper_payload
    if packet.upper_protocol != NEXT_HEADER_ICMPV6 or len(message) < HEADER_LEN:
        return False
    initial = pseudo_header_sum_ipv6(packet.src, packet.dst, NEXT_HEADER_ICMPV6, len(message))
    return ones_complement_sum(message, initial) == 0xFFFF


def emit_icmpv6(src: bytes, dst: bytes, icmp_type: int, code: int,
                body: bytes | bytearray | memoryview) -> bytes:
    """A complete ICMPv6 message from ``src`` to ``dst``; ``body`` is everything after the checksum."""
    message = bytearray(struct.pack("!BBH", icmp_type, code, 0))
    message += body
    initial = pseudo_header_sum_ipv6(src, dst, NEXT_HEADER_ICMPV6, len(message))
    struct.pack_into("!H", message, 2, internet_checksum(message, initial))
    return bytes(message)
