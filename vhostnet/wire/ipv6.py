"""IPv6 (RFC 8200): a checked packet view, extension headers walked, and a header emitter.

The view checks, in order: length of the fixed header, version, payload length
(fits the buffer; Ethernet padding beyond it is ignored), then walks the
extension headers this module knows (hop-by-hop options, routing, fragment,
destination options), each bounded by the payload, with hop-by-hop allowed
only first (RFC 8200 section 4.1). Walking stops at the first other next
header value: the upper-layer protocol (TCP, UDP, ICMPv6, "no next header")
or a header whose length is counted differently (AH, ESP): that value is
``upper_protocol`` and what follows is ``upper_payload``.

A fragment is reported (``fragment``), not reassembled; walking stops after
the fragment header of a fragment that is not the first, since what follows is
the middle of the original payload.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vhostnet.wire.errors import MalformedPacket
from vhostnet.wire.fragmenting import fragment_pieces

HEADER_LEN = 40
VERSION = 6
NEXT_HEADER_HOP_BY_HOP = 0
NEXT_HEADER_TCP = 6
NEXT_HEADER_UDP = 17
NEXT_HEADER_ROUTING = 43
NEXT_HEADER_FRAGMENT = 44
NEXT_HEADER_ICMPV6 = 58
NEXT_HEADER_NONE = 59
NEXT_HEADER_DESTINATION_OPTIONS = 60
ADDRESS_LEN = 16
UNSPECIFIED = bytes(ADDRESS_LEN)

# Extension headers whose length is (Hdr Ext Len + 1) * 8 bytes (RFC 8200 section 4);
# the fragment header is always 8 bytes and has no length field.
_EIGHT_OCTET_UNITS = (NEXT_HEADER_HOP_BY_HOP, NEXT_HEADER_ROUTING,
                      NEXT_HEADER_DESTINATION_OPTIONS)
_MIN_EXTENSION_LEN = 8
_FIXED = struct.Struct("!IHBB16s16s")
_FRAGMENT = struct.Struct("!BxHI")


@dataclass(frozen=True)
class Fragment:
    """The fragment header's fields: ``offset`` in bytes, M flag, identification."""

    offset: int
    more: bool
    ident: int


class IPv6Packet:
    """Checked view of an IPv6 packet.

    ``next_header`` is the fixed header's field (the first extension header if
    there is one); ``upper_protocol``/``upper_payload`` are what the extension
    headers lead to; ``extensions`` lists ``(type, offset, length)`` of each
    walked extension header, offsets counted from the start of ``payload``.
    ``src``/``dst`` are 16-byte ``bytes``; ``header`` is a memoryview of the fixed header
    and ``payload`` one bounded by the payload length field.
    """

    __slots__ = ("traffic_class", "flow_label", "payload_length", "next_header", "hop_limit",
                 "src", "dst", "header", "payload", "extensions", "fragment", "upper_protocol",
                 "upper_payload")

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        if len(view) < HEADER_LEN:
            raise MalformedPacket("short", f"{len(view)} bytes is shorter than an IPv6 header")
        first_word, payload_length, next_header, hop_limit, src, dst = _FIXED.unpack_from(view, 0)
        if first_word >> 28 != VERSION:
            raise MalformedPacket("bad_version", f"IP version {first_word >> 28} in an IPv6 packet")
        if HEADER_LEN + payload_length > len(view):
            raise MalformedPacket("bad_length", f"payload length {payload_length} exceeds the frame")
        self.traffic_class: int = (first_word >> 20) & 0xFF
        self.flow_label: int = first_word & 0xFFFFF
        self.payload_length: int = payload_length
        self.next_header: int = next_header
        self.hop_limit: int = hop_limit
        self.src: bytes = src
        self.dst: bytes = dst
        self.header = view[:HEADER_LEN]  # for quoting in ICMPv6 errors
        self.payload = view[HEADER_LEN : HEADER_LEN + payload_length]
        self.fragment: Fragment | None = None
        self._walk_extensions()

    def _walk_extensions(self) -> None:
        payload = self.payload
        extensions: list[tuple[int, int, int]] = []
        kind = self.next_header
        offset = 0
        while kind in _EIGHT_OCTET_UNITS or kind == NEXT_HEADER_FRAGMENT:
            if kind == NEXT_HEADER_HOP_BY_HOP and extensions:
                raise MalformedPacket("misplaced_hop_by_hop",
                                      "hop-by-hop options header not right after the IPv6 header")
            if offset + _MIN_EXTENSION_LEN > len(payload):
                raise MalformedPacket("truncated_extension",
                                      f"extension header {kind} runs past the payload")
            following = payload[offset]
            if kind == NEXT_HEADER_FRAGMENT:
                if self.fragment is not None:
                    raise MalformedPacket("repeated_fragment", "two fragment headers")
                length = _MIN_EXTENSION_LEN
                _, offset_flags, ident = _FRAGMENT.unpack_from(payload, offset)
                self.fragment = Fragment(offset_flags & 0xFFF8, bool(offset_flags & 1), ident)
            else:
                length = (payload[offset + 1] + 1) * 8
                if offset + length > len(payload):
                    raise MalformedPacket("truncated_extension",
                                          f"extension header {kind} of {length} bytes runs past "
                                          "the payload")
            extensions.append((kind, offset, length))
            offset += length
            kind = following
            if self.fragment is not None and self.fragment.offset:
                break  # a later fragment: no headers follow, only payload bytes
        self.extensions: tuple[tuple[int, int, int], ...] = tuple(extensions)
        self.upper_protocol: int = kind
        self.upper_payload = payload[offset:]


def emit_ipv6_header(src: bytes, dst: bytes, next_header: int, payload_len: int,
                     hop_limit: int = 64, traffic_class: int = 0, flow_label: int = 0) -> bytes:
    """The 40-byte fixed header (no extension headers: ``next_header`` is the upper layer's)."""
    if len(src) != ADDRESS_LEN or len(dst) != ADDRESS_LEN:
        raise ValueError("IPv6 addresses are 16 bytes")
    if not 0 <= payload_len <= 0xFFFF:
        raise ValueError(f"IPv6 payload of {payload_len} bytes does not fit the length field")
    first_word = VERSION << 28 | (traffic_class & 0xFF) << 20 | (flow_label & 0xFFFFF)
    return _FIXED.pack(first_word, payload_len, next_header, hop_limit, src, dst)


def link_local_address(mac: bytes) -> bytes:
    """fe80::/64 with the modified EUI-64 interface identifier of ``mac`` (RFC 4291 appendix A)."""
    identifier = bytes((mac[0] ^ 0x02,)) + mac[1:3] + b"\xff\xfe" + mac[3:6]
    return bytes.fromhex("fe80000000000000") + identifier


def is_multicast(address: bytes) -> bool:
    """ff00::/8."""
    return address[0] == 0xFF


def is_link_local(address: bytes) -> bool:
    """fe80::/10."""
    return address[0] == 0xFE and address[1] & 0xC0 == 0x80


def solicited_node_address(address: bytes) -> bytes:
    """ff02::1:ffXX:XXXX, where Neighbour Solicitations for ``address`` go (RFC 4291 2.7.1)."""
    return bytes.fromhex("ff0200000000000000000001ff") + address[13:16]


def multicast_mac(address: bytes) -> bytes:
    """33:33 and the group's last 32 bits (RFC 2464 section 7)."""
    return b"\x33\x33" + address[12:16]


def in_prefix(address: bytes, prefix: bytes, length: int) -> bool:
    """True when the first ``length`` bits of ``address`` are those of ``prefix``."""
    shift = 128 - length
    return int.from_bytes(address, "big") >> shift == int.from_bytes(prefix, "big") >> shift


# --- fragments (RFC 8200 section 4.5) ----------------------------------------------

FRAGMENT_HEADER_LEN = 8
MAX_PAYLOAD = 0xFFFF  # no jumbograms


def emit_fragment_header(next_header: int, offset: int, more: bool, ident: int) -> bytes:
    """The 8-byte fragment header; ``offset`` in bytes (a multiple of 8), M flag, identification."""
    if offset % 8 or not 0 <= offset <= 0xFFF8:
        raise ValueError(f"fragment offset {offset} is not a multiple of 8 below 65536")
    return _FRAGMENT.pack(next_header, offset | int(more), ident & 0xFFFFFFFF)


def emit_ipv6_fragments(src: bytes, dst: bytes, next_header: int,
                        payload: bytes | bytearray | memoryview, mtu: int, ident: int,
                        hop_limit: int = 64, traffic_class: int = 0, flow_label: int = 0
                        ) -> list[bytes]:
    """``payload`` (the upper layer's: no extension headers) as whole IPv6 packets of at most
    ``mtu`` bytes each: one plain packet if it fits, else fragments, each with a fragment
    header of identification ``ident`` and 8-byte aligned offsets, M set on all but the last.

    The source fragments here because nothing can send it a Packet Too Big: the datagrams
    come from host sockets, and the guest's link MTU is known.
    """
    if HEADER_LEN + len(payload) <= mtu:
        return [emit_ipv6_header(src, dst, next_header, len(payload), hop_limit, traffic_class,
                                 flow_label) + bytes(payload)]
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"IPv6 payload of {len(payload)} bytes is too long")
    packets = []
    for start, piece, more in fragment_pieces(payload, mtu - HEADER_LEN - FRAGMENT_HEADER_LEN,
                                              mtu):
        header = emit_ipv6_header(src, dst, NEXT_HEADER_FRAGMENT,
                                  FRAGMENT_HEADER_LEN + len(piece), hop_limit, traffic_class,
                                  flow_label)
        packets.append(header + emit_fragment_header(next_header, start, more, ident)
                       + bytes(piece))
    return packets
