"""ARP (RFC 826) for Ethernet/IPv4, and the RARP announcement used after migration."""

from __future__ import annotations

import struct

from vhostnet.wire.errors import MalformedPacket
from vhostnet.wire.ethernet import (
    BROADCAST_MAC,
    ETHERTYPE_ARP,
    ETHERTYPE_IPV4,
    ETHERTYPE_RARP,
    emit_ethernet,
)

ARP_LEN = 28
OP_REQUEST = 1
OP_REPLY = 2
OP_RARP_REQUEST = 3
HTYPE_ETHERNET = 1

_ARP_FORMAT = struct.Struct("!HHBBH6s4s6s4s")


class ArpPacket:
    """Checked view of an Ethernet/IPv4 ARP packet; anything else raises ``MalformedPacket``."""

    __slots__ = ("op", "sender_mac", "sender_ip", "target_mac", "target_ip")

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        if len(data) < ARP_LEN:
            raise MalformedPacket("short", f"ARP packet of {len(data)} bytes")
        htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP_FORMAT.unpack_from(data, 0)
        if htype != HTYPE_ETHERNET or ptype != ETHERTYPE_IPV4 or hlen != 6 or plen != 4:
            raise MalformedPacket("unsupported", "ARP for something other than Ethernet/IPv4")
        self.op: int = op
        self.sender_mac: bytes = sha
        self.sender_ip: bytes = spa
        self.target_mac: bytes = tha
        self.target_ip: bytes = tpa


def emit_arp(op: int, sender_mac: bytes, sender_ip: bytes, target_mac: bytes, target_ip: bytes) -> bytes:
    return _ARP_FORMAT.pack(HTYPE_ETHERNET, ETHERTYPE_IPV4, 6, 4, op,
                            sender_mac, sender_ip, target_mac, target_ip)


def arp_reply_frame(request: ArpPacket, our_mac: bytes) -> bytes:
    """The Ethernet frame answering ``request``: "target_ip is at our_mac", sent to the asker."""
    reply = emit_arp(OP_REPLY, our_mac, request.target_ip, request.sender_mac, request.sender_ip)
    return emit_ethernet(request.sender_mac, our_mac, ETHERTYPE_ARP, reply)


def rarp_frame(mac: bytes) -> bytes:
    """A broadcast RARP request announcing ``mac`` (what QEMU sends after live migration
    so that switches learn where the guest now is)."""
    body = emit_arp(OP_RARP_REQUEST, mac, bytes(4), mac, bytes(4))
    return emit_ethernet(BROADCAST_MAC, mac, ETHERTYPE_RARP, body)
