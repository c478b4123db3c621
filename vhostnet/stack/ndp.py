"""IPv6 on the guest link: the one NDP answer vhostnet gives.

vhostnet carries IPv4 only. A guest that asks for an IPv6 router (Router
Solicitation, RFC 4861 section 6.3.7) gets one Router Advertisement with
router lifetime 0, no prefix and neither the M nor the O flag: "there is no
IPv6 router and no DHCPv6 here". Without it, IPv6 autoconfiguration waits
for its timeout; iPXE, for one, holds up the whole PXE boot for about 12 s.
Every other IPv6 packet is dropped and counted by the dispatcher. The IPv6
and ICMPv6 wire formats are in ``vhostnet.wire.ipv6`` and ``vhostnet.wire.icmpv6``.
"""

from __future__ import annotations

import struct

from vhostnet.wire.ethernet import ETHERTYPE_IPV6, emit_ethernet
from vhostnet.wire.icmpv6 import (
    ROUTER_ADVERTISEMENT,
    ROUTER_SOLICITATION,
    emit_icmpv6,
    icmpv6_checksum_ok,
)
from vhostnet.wire.ipv6 import (
    NEXT_HEADER_ICMPV6,
    UNSPECIFIED,
    IPv6Packet,
    emit_ipv6_header,
    link_local_address,
)

NDP_HOP_LIMIT = 255  # NDP messages must arrive with 255: proof they never crossed a router
OPTION_SOURCE_LINK_ADDRESS = 1
ALL_NODES = bytes.fromhex("ff020000000000000000000000000001")
ALL_NODES_MAC = bytes.fromhex("333300000001")


def is_router_solicitation(packet: IPv6Packet) -> bool:
    """A valid Router Solicitation (RFC 4861 section 6.1.1), checksum included.

    Only one carried directly after the fixed header counts: no extension headers.
    """
    payload = packet.payload
    return (packet.next_header == NEXT_HEADER_ICMPV6 and packet.hop_limit == NDP_HOP_LIMIT
            and len(payload) >= 8 and payload[0] == ROUTER_SOLICITATION
            and payload[1] == 0 and icmpv6_checksum_ok(packet))


def no_router_advertisement(solicitation: IPv6Packet, guest_mac: bytes, our_mac: bytes) -> bytes:
    """The Ethernet frame answering ``solicitation``: lifetime 0, no prefixes, M and O clear."""
    src = link_local_address(our_mac)
    if solicitation.src == UNSPECIFIED:
        dst, dst_mac = ALL_NODES, ALL_NODES_MAC  # the sender has no address to answer yet
    else:
        dst, dst_mac = solicitation.src, guest_mac
    # Hop limit 0 (unspecified), flags 0, router lifetime 0, reachable time 0,
    # retransmission timer 0 (both "unspecified"), then our link-layer address.
    body = (struct.pack("!BBHII", 0, 0, 0, 0, 0)
            + struct.pack("!BB6s", OPTION_SOURCE_LINK_ADDRESS, 1, our_mac))
    message = emit_icmpv6(src, dst, ROUTER_ADVERTISEMENT, 0, body)
    header = emit_ipv6_header(src, dst, NEXT_HEADER_ICMPV6, len(message), hop_limit=NDP_HOP_LIMIT)
    return emit_ethernet(dst_mac, our_mac, ETHERTYPE_IPV6, header + message)
