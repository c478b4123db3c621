"""IPv6 on the guest link: a checked header view and the one NDP answer vhostnet gives.

vhostnet carries IPv4 only. A guest that asks for an IPv6 router (Router
Solicitation, RFC 4861 section 6.3.7) gets one Router Advertisement with
router lifetime 0, no prefix and neither the M nor the O flag: "there is no
IPv6 router and no DHCPv6 here". Without it, IPv6 autoconfiguration waits
for its timeout; iPXE, for one, holds up the whole PXE boot for about 12 s.
Every other IPv6 packet is dropped and counted by the dispatcher.
"""

from __future__ import annotations

import struct

from vhostnet.wire.checksum import internet_checksum
from vhostnet.wire.errors import MalformedPacket
from vhostnet.wire.ethernet import ETHERTYPE_IPV6, emit_ethernet

IPV6_HEADER_LEN = 40
NEXT_HEADER_ICMPV6 = 58
ICMPV6_ROUTER_SOLICITATION = 133
ICMPV6_ROUTER_ADVERTISEMENT = 134
NDP_HOP_LIMIT = 255  # NDP messages must arrive with 255: proof they never crossed a router
OPTION_SOURCE_LINK_ADDRESS = 1
UNSPECIFIED = bytes(16)
ALL_NODES = bytes.fromhex("ff020000000000000000000000000001")
ALL_NODES_MAC = bytes.fromhex("333300000001")

_HEADER = struct.Struct("!IHBB16s16s")


class IPv6Packet:
    """Checked view of an IPv6 packet: fixed header, payload trimmed to its stated length.

    Extension headers are not walked: ``next_header`` is the first one, so a
    packet with extension headers simply is not ICMPv6 to this module.
    """

    __slots__ = ("next_header", "hop_limit", "src", "dst", "payload")

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        if len(view) < IPV6_HEADER_LEN:
            raise MalformedPacket("short", f"{len(view)} bytes is shorter than an IPv6 header")
        first_word, payload_length, next_header, hop_limit, src, dst = _HEADER.unpack_from(view, 0)
        if first_word >> 28 != 6:
            raise MalformedPacket("version", f"IP version {first_word >> 28} in an IPv6 frame")
        if IPV6_HEADER_LEN + payload_length > len(view):
            raise MalformedPacket("length", f"payload length {payload_length} exceeds the frame")
        self.next_header: int = next_header
        self.hop_limit: int = hop_limit
        self.src: bytes = src
        self.dst: bytes = dst
        self.payload = view[IPV6_HEADER_LEN:IPV6_HEADER_LEN + payload_length]


def _pseudo_header(src: bytes, dst: bytes, length: int) -> bytes:
    # RFC 8200 section 8.1: addresses, upper-layer length, three zero bytes, next header.
    return src + dst + struct.pack("!IxxxB", length, NEXT_HEADER_ICMPV6)


def icmpv6_checksum_ok(packet: IPv6Packet) -> bool:
    data = _pseudo_header(packet.src, packet.dst, len(packet.payload)) + bytes(packet.payload)
    return internet_checksum(data) == 0


def link_local_address(mac: bytes) -> bytes:
    """fe80::/64 with the modified EUI-64 interface identifier of ``mac`` (RFC 4291 appendix A)."""
    identifier = bytes((mac[0] ^ 0x02,)) + mac[1:3] + b"\xff\xfe" + mac[3:6]
    return bytes.fromhex("fe80000000000000") + identifier


def is_router_solicitation(packet: IPv6Packet) -> bool:
    """A valid Router Solicitation (RFC 4861 section 6.1.1), checksum included."""
    payload = packet.payload
    return (packet.next_header == NEXT_HEADER_ICMPV6 and packet.hop_limit == NDP_HOP_LIMIT
            and len(payload) >= 8 and payload[0] == ICMPV6_ROUTER_SOLICITATION
            and payload[1] == 0 and icmpv6_checksum_ok(packet))


def no_router_advertisement(solicitation: IPv6Packet, guest_mac: bytes, our_mac: bytes) -> bytes:
    """The Ethernet frame answering ``solicitation``: lifetime 0, no prefixes, M and O clear."""
    src = link_local_address(our_mac)
    if solicitation.src == UNSPECIFIED:
        dst, dst_mac = ALL_NODES, ALL_NODES_MAC  # the sender has no address to answer yet
    else:
        dst, dst_mac = solicitation.src, guest_mac
    # Type, code, checksum, hop limit 0 (unspecified), flags 0, router lifetime 0,
    # reachable time 0, retransmission timer 0 (both "unspecified").
    message = bytearray(struct.pack("!BBHBBHII", ICMPV6_ROUTER_ADVERTISEMENT, 0, 0, 0, 0, 0, 0, 0))
    message += struct.pack("!BB6s", OPTION_SOURCE_LINK_ADDRESS, 1, our_mac)
    checksum = internet_checksum(_pseudo_header(src, dst, len(message)) + message)
    struct.pack_into("!H", message, 2, checksum)
    header = _HEADER.pack(6 << 28, len(message), NEXT_HEADER_ICMPV6, NDP_HOP_LIMIT, src, dst)
    return emit_ethernet(dst_mac, our_mac, ETHERTYPE_IPV6, header + message)
