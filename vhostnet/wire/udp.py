"""UDP (RFC 768): checked datagram view and emitter.

The NAT engine that moves guest UDP flows onto host sockets is in ``udp_nat.py``.
"""

from __future__ import annotations

import struct

from vhostnet.wire.checksum import PROTO_UDP, l4_checksum, l4_checksum_ok
from vhostnet.wire.errors import MalformedPacket

HEADER_LEN = 8


class UdpDatagram:
    """Checked view of a UDP datagram carried in an IPv4 or IPv6 packet (by the addresses' length).

    The length field must cover the header and fit in the IP payload (trailing
    bytes beyond it are ignored); the checksum is verified against the
    pseudo-header unless the sender left it zero or ``verify`` is False (a partial
    checksum the guest's virtio driver left to the device).
    """

    __slots__ = ("src_port", "dst_port", "length", "payload")

    def __init__(self, src_ip: bytes, dst_ip: bytes, data: bytes | bytearray | memoryview,
                 verify: bool = True) -> None:
        view = memoryview(data)
        if len(view) < HEADER_LEN:
            raise MalformedPacket("short", f"UDP datagram of {len(view)} bytes")
        self.src_port, self.dst_port, self.length = struct.unpack_from("!HHH", view, 0)
        if self.length < HEADER_LEN or self.length > len(view):
            raise MalformedPacket("bad_length", f"UDP length {self.length}")
        if verify and not l4_checksum_ok(src_ip, dst_ip, PROTO_UDP, view[: self.length]):
            raise MalformedPacket("bad_checksum", "UDP checksum")
        self.payload = view[HEADER_LEN : self.length]


def emit_udp(src_ip: bytes, src_port: int, dst_ip: bytes, dst_port: int,
             payload: bytes | bytearray | memoryview) -> bytes:
    """Header plus payload, with the checksum over the pseudo-header filled in."""
    length = HEADER_LEN + len(payload)
    if length > 0xFFFF:
        raise ValueError(f"UDP datagram of {length} bytes is too long")
    segment = bytearray(struct.pack("!HHHH", src_port, dst_port, length, 0))
    segment += payload
    struct.pack_into("!H", segment, 6, l4_checksum(src_ip, dst_ip, PROTO_UDP, segment))
    return bytes(segment)
