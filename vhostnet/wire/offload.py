"""Checksum and segmentation offloads, as the stack sees the virtio-net header (virtio 1.x 5.1.6).

The device keeps each frame's header as one integer, the *vnet word*:
``flags | gso_type << 8 | gso_size << 16 | csum_start << 32 | csum_offset << 48``
(the Cython kernel validates guest headers into that form and writes RX headers
from it). This module builds and reads those words, so the stack needs no
knowledge of the header's byte layout.

Guest -> stack: a frame with ``NEEDS_CSUM`` carries a partial L4 checksum (only
the pseudo-header sum), so its TCP/UDP checksum is not verified; GSO frames
(up to 64 KiB) need nothing else, because vhostnet ends every TCP connection
itself and writes the payload to a host socket whole.

Stack -> guest: with GUEST_CSUM only, data segments skip the L4 checksum and
say ``DATA_VALID``; with GUEST_TSO4 (GUEST_TSO6 for IPv6) as well, TCP data goes out
in segments of up to 64 KiB with ``gso_type`` TCPV4 (TCPV6), ``gso_size`` the flow's MSS and a partial
checksum (``NEEDS_CSUM`` at the TCP header, pseudo-header sum in the field), as
Linux's own tap and GRO produce them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

NEEDS_CSUM = 1
DATA_VALID = 2
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_TCPV6 = 4

ETH_HEADER_LEN = 14
IPV4_HEADER_LEN = 20  # what the stack emits: no options
IPV6_HEADER_LEN = 40  # likewise: no extension headers
TCP_CHECKSUM_OFFSET = 16
UDP_CHECKSUM_OFFSET = 6
# The largest TCP payload in one IPv4 packet with 20-byte IP and TCP headers.
MAX_TSO_PAYLOAD = 0xFFFF - IPV4_HEADER_LEN - 20


@dataclass(frozen=True)
class GuestOffloads:
    """What the guest negotiated for frames it receives."""

    csum: bool = False  # VIRTIO_NET_F_GUEST_CSUM: unverified / partial L4 checksums are fine
    tso4: bool = False  # VIRTIO_NET_F_GUEST_TSO4 (needs csum): TCPv4 segments beyond the MSS
    tso6: bool = False  # VIRTIO_NET_F_GUEST_TSO6 (needs csum): TCPv6 segments beyond the MSS

    def tso(self, ipv6: bool) -> bool:
        """Large TCP segments are fine for this family."""
        return self.tso6 if ipv6 else self.tso4


NO_OFFLOADS = GuestOffloads()


# The vnet word's layout (as in ext/vnet.pxd): where each field starts, and its mask.
FLAGS_SHIFT, FLAGS_MASK = 0, 0xFF
GSO_TYPE_SHIFT, GSO_TYPE_MASK = 8, 0xFF
GSO_SIZE_SHIFT, GSO_SIZE_MASK = 16, 0xFFFF
CSUM_START_SHIFT, CSUM_START_MASK = 32, 0xFFFF
CSUM_OFFSET_SHIFT, CSUM_OFFSET_MASK = 48, 0xFFFF


class VnetFields(NamedTuple):
    """The virtio-net header offload fields a vnet word carries."""

    flags: int
    gso_type: int
    gso_size: int
    csum_start: int
    csum_offset: int


def vnet_word(flags: int, gso_type: int = GSO_NONE, gso_size: int = 0, csum_start: int = 0,
              csum_offset: int = 0) -> int:
    """Pack header fields into the vnet word the device and the Cython kernel exchange.

    Raises ValueError for a field that does not fit its width.
    """
    if (flags & ~FLAGS_MASK or gso_type & ~GSO_TYPE_MASK or gso_size & ~GSO_SIZE_MASK
            or csum_start & ~CSUM_START_MASK or csum_offset & ~CSUM_OFFSET_MASK):
        raise ValueError("a vnet field does not fit its width")
    return (flags << FLAGS_SHIFT | gso_type << GSO_TYPE_SHIFT | gso_size << GSO_SIZE_SHIFT
            | csum_start << CSUM_START_SHIFT | csum_offset << CSUM_OFFSET_SHIFT)


def vnet_fields(word: int) -> VnetFields:
    """The header fields of a vnet word (a tuple: flags, gso_type, gso_size, csum_start,
    csum_offset)."""
    return VnetFields((word >> FLAGS_SHIFT) & FLAGS_MASK, (word >> GSO_TYPE_SHIFT) & GSO_TYPE_MASK,
                      (word >> GSO_SIZE_SHIFT) & GSO_SIZE_MASK,
                      (word >> CSUM_START_SHIFT) & CSUM_START_MASK,
                      (word >> CSUM_OFFSET_SHIFT) & CSUM_OFFSET_MASK)


def partial_l4_checksum(word: int, l4_start: int, checksum_offset: int) -> bool:
    """True when the guest left the L4 checksum at ``l4_start`` partial (not to be verified).

    Only a partial checksum exactly at the L4 header's checksum field counts; one
    pointing elsewhere leaves the L4 checksum to be verified as usual.
    """
    return (word >> FLAGS_SHIFT & NEEDS_CSUM != 0
            and (word >> CSUM_START_SHIFT) & CSUM_START_MASK == l4_start
            and (word >> CSUM_OFFSET_SHIFT) & CSUM_OFFSET_MASK == checksum_offset)


def tcp_data_word(payload_len: int, mss: int, ipv6: bool = False) -> int:
    """The vnet word of a TCP data segment with a partial checksum (segmented by the guest if
    large), in an IPv4 packet or (``ipv6``) an IPv6 one without extension headers."""
    if payload_len <= mss:
        gso = GSO_NONE
    else:
        gso = GSO_TCPV6 if ipv6 else GSO_TCPV4
    ip_len = IPV6_HEADER_LEN if ipv6 else IPV4_HEADER_LEN
    return vnet_word(NEEDS_CSUM, gso, mss if gso else 0, ETH_HEADER_LEN + ip_len,
                     TCP_CHECKSUM_OFFSET)


DATA_VALID_WORD = vnet_word(DATA_VALID)
