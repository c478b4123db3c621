# The vnet word: a frame's virtio-net header offload fields (virtio 1.x, 5.1.6) as one 64-bit
# integer, the form in which they travel through a FrameBatch and reach Python
# (``vhostnet.wire.offload`` is the Python side of the same layout):
#
#     flags | gso_type << 8 | gso_size << 16 | csum_start << 32 | csum_offset << 48
#
# Compile-time only (inline, GIL-free): kernels cimport these instead of shifting by hand.

from libc.stdint cimport uint8_t, uint16_t, uint64_t

cdef enum:
    VNET_F_NEEDS_CSUM = 1     # partial L4 checksum: csum_start/csum_offset say where
    VNET_F_DATA_VALID = 2     # device -> driver: checksums already verified
    VNET_GSO_NONE = 0
    VNET_GSO_TCPV4 = 1
    VNET_GSO_UDP = 3
    VNET_GSO_TCPV6 = 4
    VNET_GSO_ECN = 0x80


cdef struct VnetFields:
    uint8_t flags
    uint8_t gso_type
    uint16_t gso_size
    uint16_t csum_start
    uint16_t csum_offset


cdef inline uint64_t vnet_encode(uint8_t flags, uint8_t gso_type, uint16_t gso_size,
                                 uint16_t csum_start, uint16_t csum_offset) noexcept nogil:
    """The vnet word of these header fields."""
    return (<uint64_t>flags | (<uint64_t>gso_type << 8) | (<uint64_t>gso_size << 16)
            | (<uint64_t>csum_start << 32) | (<uint64_t>csum_offset << 48))


cdef inline VnetFields vnet_decode(uint64_t word) noexcept nogil:
    """The header fields of a vnet word."""
    cdef VnetFields fields
    fields.flags = word & 0xFF
    fields.gso_type = (word >> 8) & 0xFF
    fields.gso_size = (word >> 16) & 0xFFFF
    fields.csum_start = (word >> 32) & 0xFFFF
    fields.csum_offset = (word >> 48) & 0xFFFF
    return fields


cdef inline uint8_t vnet_gso_type(uint64_t word) noexcept nogil:
    return (word >> 8) & 0xFF


cdef inline bint vnet_partial_csum_at(uint64_t word, uint16_t l4_start,
                                      uint16_t csum_offset) noexcept nogil:
    """True when the word says NEEDS_CSUM with the checksum exactly at ``l4_start + csum_offset``:
    the guest's driver left that L4 checksum partial, for the device (us) to complete."""
    cdef VnetFields fields = vnet_decode(word)
    return ((fields.flags & VNET_F_NEEDS_CSUM) != 0 and fields.csum_start == l4_start
            and fields.csum_offset == csum_offset)
