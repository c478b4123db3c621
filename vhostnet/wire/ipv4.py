"""IPv4 (RFC 791): a checked packet view and a header emitter.

The view checks, in order: length of the fixed header, version, IHL (at least 5
words and inside the buffer), total length (covers the header, fits the buffer;
Ethernet padding beyond it is ignored), header checksum, and fragmentation.
Fragments are refused (reason "fragment") unless the caller asks for them
(``allow_fragments``): the stack hands those to its reassembler
(``vhostnet.stack.fragments``) and parses the reassembled datagram again.

``emit_ipv4_fragments`` cuts a datagram too large for the link into fragments
(RFC 791 section 3.2): every fragment but the last carries a multiple of 8 bytes.
"""

from __future__ import annotations

import struct

from vhostnet.wire._csum import ones_complement_sum as _kernel_sum
from vhostnet.wire.checksum import internet_checksum
from vhostnet.wire.errors import MalformedPacket
from vhostnet.wire.fragmenting import fragment_pieces

MIN_HEADER_LEN = 20
FLAG_DONT_FRAGMENT = 0x4000
FLAG_MORE_FRAGMENTS = 0x2000
FRAGMENT_OFFSET_MASK = 0x1FFF
BROADCAST = b"\xff\xff\xff\xff"
_FIXED = struct.Struct("!xBHHHBB")


class IPv4Packet:
    """Checked view of an IPv4 packet.

    ``src``/``dst`` are 4-byte ``bytes``; ``header`` is a copy of the header
    (options included, for quoting in ICMP errors); ``payload`` is a memoryview
    bounded by the total length field. ``checksum_partial`` is set by the stack when
    the guest left the TCP/UDP checksum partial (virtio NEEDS_CSUM): not to be verified.
    ``fragment_offset`` (in bytes) and ``more_fragments`` describe a fragment; a view made
    without ``allow_fragments`` is never one.
    """

    __slots__ = ("version", "header_len", "tos", "total_length", "ident", "flags_fragment",
                 "ttl", "proto", "src", "dst", "header", "payload", "checksum_partial",
                 "fragment_offset", "more_fragments")

    def __init__(self, data: bytes | bytearray | memoryview, allow_fragments: bool = False
                 ) -> None:
        view = memoryview(data)
        if len(view) < MIN_HEADER_LEN:
            raise MalformedPacket("short", f"{len(view)} bytes is shorter than an IPv4 header")
        if view.format != "B" or not view.c_contiguous:
            view = memoryview(bytes(view))
        version_ihl = view[0]
        self.version = version_ihl >> 4
        if self.version != 4:
            raise MalformedPacket("bad_version", f"version {self.version}")
        self.header_len = (version_ihl & 0x0F) * 4
        if self.header_len < MIN_HEADER_LEN or self.header_len > len(view):
            raise MalformedPacket("bad_ihl", f"header length {self.header_len}")
        (self.tos, self.total_length, self.ident, self.flags_fragment, self.ttl, self.proto) = (
            _FIXED.unpack_from(view, 0)
        )
        if self.total_length < self.header_len or self.total_length > len(view):
            raise MalformedPacket("bad_length", f"total length {self.total_length}")
        if _kernel_sum(view[: self.header_len]) != 0xFFFF:  # (a bytes-like view: no wrapper)
            raise MalformedPacket("bad_checksum", "IPv4 header checksum")
        self.fragment_offset = (self.flags_fragment & FRAGMENT_OFFSET_MASK) * 8
        self.more_fragments = bool(self.flags_fragment & FLAG_MORE_FRAGMENTS)
        if not allow_fragments and self.is_fragment:
            raise MalformedPacket("fragment", "IPv4 fragments are not reassembled here")
        self.src = bytes(view[12:16])
        self.dst = bytes(view[16:20])
        self.header = bytes(view[: self.header_len])
        self.payload = view[self.header_len : self.total_length]
        self.checksum_partial = False

    @property
    def is_fragment(self) -> bool:
        """A piece of a larger datagram (a later fragment, or the first with MF set)."""
        return self.more_fragments or self.fragment_offset != 0


def emit_ipv4_header(
    src: bytes,
    dst: bytes,
    proto: int,
    payload_len: int,
    ttl: int = 64,
    tos: int = 0,
    ident: int = 0,
    flags_fragment: int = FLAG_DONT_FRAGMENT,
) -> bytes:
    """A 20-byte header with a correct checksum; by default DF set and no fragment fields.

    With DF set the identification field has no meaning (RFC 6864), so 0 is fine.
    """
    total = MIN_HEADER_LEN + payload_len
    if total > 0xFFFF:
        raise ValueError(f"IPv4 packet of {total} bytes is too long")
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, tos, total, ident, flags_fragment,
                                   ttl, proto, 0, src, dst))
    struct.pack_into("!H", header, 10, internet_checksum(header))
    return bytes(header)


def emit_ipv4_fragments(src: bytes, dst: bytes, proto: int,
                        payload: bytes | bytearray | memoryview, mtu: int, ident: int,
                        ttl: int = 64, tos: int = 0) -> list[bytes]:
    """``payload`` as whole IPv4 packets (headers included) of at most ``mtu`` bytes each.

    One packet with DF set if it fits; otherwise fragments with DF clear, MF set on all
    but the last, identification ``ident`` (unique per source, destination and protocol
    while fragments may live: RFC 6864) and 8-byte aligned offsets.
    """
    if MIN_HEADER_LEN + len(payload) <= mtu:
        return [emit_ipv4_header(src, dst, proto, len(payload), ttl, tos) + bytes(payload)]
    if MIN_HEADER_LEN + len(payload) > 0xFFFF:
        raise ValueError(f"IPv4 datagram of {MIN_HEADER_LEN + len(payload)} bytes is too long")
    packets = []
    for start, piece, more in fragment_pieces(payload, mtu - MIN_HEADER_LEN, mtu):
        header = emit_ipv4_header(src, dst, proto, len(piece), ttl, tos, ident & 0xFFFF,
                                  (FLAG_MORE_FRAGMENTS if more else 0) | start // 8)
        packets.append(header + bytes(piece))
    return packets
