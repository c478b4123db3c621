"""IPv4 (RFC 791): a checked packet view and a header emitter.

The view checks, in order: length of the fixed header, version, IHL (at least 5
words and inside the buffer), total length (covers the header, fits the buffer;
Ethernet padding beyond it is ignored), header checksum, and fragmentation.
Fragments are refused (reason "fragment"): nothing in this stack reassembles,
and guests using path-MTU discovery do not fragment.
"""

from __future__ import annotations

import struct

from vhostnet.wire.checksum import internet_checksum, ones_complement_sum
from vhostnet.wire.errors import MalformedPacket

MIN_HEADER_LEN = 20
FLAG_DONT_FRAGMENT = 0x4000
FLAG_MORE_FRAGMENTS = 0x2000
FRAGMENT_OFFSET_MASK = 0x1FFF
BROADCAST = b"\xff\xff\xff\xff"


class IPv4Packet:
    """Checked view of an IPv4 packet.

    ``src``/``dst`` are 4-byte ``bytes``; ``header`` is a copy of the header
    (options included, for quoting in ICMP errors); ``payload`` is a memoryview
    bounded by the total length field. ``checksum_partial`` is set by the stack when
    the guest left the TCP/UDP checksum partial (virtio NEEDS_CSUM): not to be verified.
    """

    __slots__ = ("version", "header_len", "tos", "total_length", "ident", "flags_fragment",
                 "ttl", "proto", "src", "dst", "header", "payload", "checksum_partial")

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        if len(view) < MIN_HEADER_LEN:
            raise MalformedPacket("short", f"{len(view)} bytes is shorter than an IPv4 header")
        version_ihl = view[0]
        self.version = version_ihl >> 4
        if self.version != 4:
            raise MalformedPacket("bad_version", f"version {self.version}")
        self.header_len = (version_ihl & 0x0F) * 4
        if self.header_len < MIN_HEADER_LEN or self.header_len > len(view):
            raise MalformedPacket("bad_ihl", f"header length {self.header_len}")
        (self.tos, self.total_length, self.ident, self.flags_fragment, self.ttl, self.proto) = (
            struct.unpack_from("!xBHHHBB", view, 0)
        )
        if self.total_length < self.header_len or self.total_length > len(view):
            raise MalformedPacket("bad_length", f"total length {self.total_length}")
        if ones_complement_sum(view[: self.header_len]) != 0xFFFF:
            raise MalformedPacket("bad_checksum", "IPv4 header checksum")
        if self.flags_fragment & (FLAG_MORE_FRAGMENTS | FRAGMENT_OFFSET_MASK):
            raise MalformedPacket("fragment", "IPv4 fragments are not reassembled")
        self.src = bytes(view[12:16])
        self.dst = bytes(view[16:20])
        self.header = bytes(view[: self.header_len])
        self.payload = view[self.header_len : self.total_length]
        self.checksum_partial = False


def emit_ipv4_header(
    src: bytes,
    dst: bytes,
    proto: int,
    payload_len: int,
    ttl: int = 64,
    tos: int = 0,
    ident: int = 0,
) -> bytes:
    """A 20-byte header with DF set and a correct checksum.

    With DF set the identification field has no meaning (RFC 6864), so 0 is fine.
    """
    total = MIN_HEADER_LEN + payload_len
    if total > 0xFFFF:
        raise ValueError(f"IPv4 packet of {total} bytes is too long")
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, tos, total, ident, FLAG_DONT_FRAGMENT,
                                   ttl, proto, 0, src, dst))
    struct.pack_into("!H", header, 10, internet_checksum(header))
    return bytes(header)
