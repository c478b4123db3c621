"""The Internet checksum (RFC 1071) and the IPv4 pseudo-header sums TCP and UDP use.

These are the Python reference versions, used by the control path (DHCP, ARP,
ICMP, new flows) and by tests. Bulk data goes through the Cython kernels. numpy
does the summing so that a 64 KiB segment costs microseconds, not milliseconds.
"""

from __future__ import annotations

import numpy as np

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17


def ones_complement_sum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """Folded 16-bit one's complement sum of ``data`` (odd length padded with a zero byte)."""
    view = memoryview(data).cast("B")
    total = initial
    if len(view) >= 2:
        words = np.frombuffer(view[: len(view) & ~1], dtype=">u2")
        total += int(words.sum(dtype=np.uint64))
    if len(view) & 1:
        total += view[-1] << 8
    # Fold the carries back in; two rounds are enough for any 64-bit sum of
    # 16-bit words, a loop keeps it obviously right.
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def internet_checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The checksum field value: the complement of the folded sum."""
    return ~ones_complement_sum(data, initial) & 0xFFFF


def pseudo_header_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """Sum of the IPv4 pseudo-header (RFC 793 / RFC 768) for an L4 segment of ``length`` bytes."""
    return ones_complement_sum(src + dst + bytes((0, proto)) + length.to_bytes(2, "big"))


def l4_checksum(src: bytes, dst: bytes, proto: int, segment: bytes | bytearray | memoryview) -> int:
    """Checksum for a TCP or UDP segment whose checksum field is zero.

    UDP transmits a computed 0 as 0xFFFF (RFC 768), since 0 means "no checksum".
    """
    value = internet_checksum(segment, pseudo_header_sum(src, dst, proto, len(segment)))
    if proto == PROTO_UDP and value == 0:
        return 0xFFFF
    return value


def l4_checksum_ok(src: bytes, dst: bytes, proto: int, segment: bytes | bytearray | memoryview) -> bool:
    """True when a received TCP/UDP segment (checksum field included) verifies.

    A UDP checksum of zero means the sender did not compute one, which IPv4 allows.
    """
    if proto == PROTO_UDP and len(segment) >= 8 and segment[6] == 0 and segment[7] == 0:
        return True
    return ones_complement_sum(segment, pseudo_header_sum(src, dst, proto, len(segment))) == 0xFFFF
