"""The Internet checksum (RFC 1071) and the IPv4 and IPv6 pseudo-header sums TCP and UDP use.

The summing itself is a small C kernel (``ext/csum.pyx``): called for every
frame, a Python or numpy loop cost about 9 µs per call, mostly overhead on
20-byte headers; the kernel costs well under one.
"""

from __future__ import annotations

from vhostnet.wire._csum import l4_sum_verifies
from vhostnet.wire._csum import ones_complement_sum as _kernel_sum

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17


def ones_complement_sum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """Folded 16-bit one's complement sum of ``data`` (odd length padded with a zero byte)."""
    view = memoryview(data)
    if view.format != "B" or not view.c_contiguous:
        view = memoryview(bytes(view))
    return _kernel_sum(view, initial)


def internet_checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The checksum field value: the complement of the folded sum."""
    return ~ones_complement_sum(data, initial) & 0xFFFF


def pseudo_header_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """Sum of the IPv4 pseudo-header (RFC 793 / RFC 768) for an L4 segment of ``length`` bytes."""
    # Plain integer arithmetic: six 16-bit words are not worth a buffer.
    total = ((src[0] << 8 | src[1]) + (src[2] << 8 | src[3]) + (dst[0] << 8 | dst[1])
             + (dst[2] << 8 | dst[3]) + proto + length)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _pseudo_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """The pseudo-header sum of either family, told apart by the address length."""
    if len(src) == 16:
        return pseudo_header_sum_ipv6(src, dst, proto, length)
    return pseudo_header_sum(src, dst, proto, length)


def l4_checksum(src: bytes, dst: bytes, proto: int, segment: bytes | bytearray | memoryview) -> int:
    """Checksum for a TCP or UDP segment whose checksum field is zero (IPv4 or IPv6 addresses).

    UDP transmits a computed 0 as 0xFFFF (RFC 768), since 0 means "no checksum".
    """
    value = internet_checksum(segment, _pseudo_sum(src, dst, proto, len(segment)))
    if proto == PROTO_UDP and value == 0:
        return 0xFFFF
    return value


def l4_checksum_ok(src: bytes, dst: bytes, proto: int, segment: bytes | bytearray | memoryview) -> bool:
    """True when a received TCP/UDP segment (checksum field included) verifies.

    A UDP checksum of zero means the sender did not compute one, which IPv4 allows
    and IPv6 does not (RFC 8200 section 8.1).
    """
    if (proto == PROTO_UDP and len(src) == 4 and len(segment) >= 8 and segment[6] == 0
            and segment[7] == 0):
        return True
    if type(src) is bytes and type(dst) is bytes and (
            type(segment) is bytes
            or type(segment) is memoryview and segment.format == "B" and segment.c_contiguous):
        return l4_sum_verifies(src, dst, proto, segment)  # one C call: every guest segment
    return ones_complement_sum(segment, _pseudo_sum(src, dst, proto, len(segment))) == 0xFFFF


def pseudo_header_sum_ipv6(src: bytes, dst: bytes, next_header: int, length: int) -> int:
    """Sum of the IPv6 pseudo-header (RFC 8200 section 8.1) for an upper-layer packet.

    The addresses, the 32-bit upper-layer length, three zero bytes and the next
    header value; ``next_header`` is the upper-layer protocol (e.g. 58 for ICMPv6),
    not the first extension header. Pass the result as ``initial`` to the sums above.
    """
    # Adding the 32-bit length whole is the same as adding its two 16-bit words:
    # folding is arithmetic modulo 0xFFFF.
    return ones_complement_sum(src + dst, length + next_header)
