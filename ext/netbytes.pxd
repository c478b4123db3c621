# Byte order and the Internet checksum for the Cython kernels: the one implementation.
#
# Compile-time only (inline, GIL-free; no module behind it): a kernel writes
# `from netbytes cimport be16, sum_bytes, fold` and each helper is inlined where
# it is used. ``vhostnet.wire.checksum`` exposes the same sum to Python (ext/csum.pyx).

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

cdef extern from "<endian.h>" nogil:
    unsigned int be32toh(unsigned int)


cdef inline uint16_t be16(const uint8_t *p) noexcept nogil:
    """The big-endian (network order) 16-bit value at ``p``."""
    return (<uint16_t>p[0] << 8) | p[1]


cdef inline uint32_t be32(const uint8_t *p) noexcept nogil:
    """The big-endian (network order) 32-bit value at ``p``."""
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline uint16_t le16(const uint8_t *p) noexcept nogil:
    """The little-endian 16-bit value at ``p`` (virtio's byte order)."""
    return p[0] | (<uint16_t>p[1] << 8)


cdef inline void put_le16(uint8_t *p, uint16_t v) noexcept nogil:
    """Store ``v`` little-endian at ``p`` (virtio's byte order)."""
    p[0] = v & 0xFF
    p[1] = v >> 8


cdef inline void put16(uint8_t *p, uint64_t v) noexcept nogil:
    """Store the low 16 bits of ``v`` big-endian at ``p``."""
    p[0] = (v >> 8) & 0xFF
    p[1] = v & 0xFF


cdef inline void put32(uint8_t *p, uint64_t v) noexcept nogil:
    """Store the low 32 bits of ``v`` big-endian at ``p``."""
    p[0] = (v >> 24) & 0xFF
    p[1] = (v >> 16) & 0xFF
    p[2] = (v >> 8) & 0xFF
    p[3] = v & 0xFF


cdef inline uint64_t sum_bytes(const uint8_t *data, Py_ssize_t length) noexcept nogil:
    """Unfolded one's complement sum of ``data`` as big-endian 16-bit words (odd byte padded).

    Summing 32-bit words into 64 bits is the same sum once folded (2**16 = 1 in
    one's complement) and loses no carry below 2**32 words, far beyond any frame.
    """
    cdef uint64_t total = 0
    cdef Py_ssize_t i = 0
    cdef unsigned int word
    while i + 4 <= length:
        memcpy(&word, data + i, 4)
        total += be32toh(word)
        i += 4
    if i + 2 <= length:
        total += (<uint64_t>data[i] << 8) | data[i + 1]
        i += 2
    if i < length:
        total += <uint64_t>data[i] << 8
    return total


cdef inline uint16_t fold(uint64_t total) noexcept nogil:
    """An unfolded sum (``sum_bytes`` plus anything added to it) folded to 16 bits."""
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return <uint16_t>total


cdef inline uint16_t checksum_field(uint64_t total) noexcept nogil:
    """The checksum field value for an unfolded sum: the complement of the folded sum."""
    return (~fold(total)) & 0xFFFF


cdef inline bint sum_verifies(uint64_t total) noexcept nogil:
    """True when an unfolded sum over data that includes its checksum field verifies."""
    return fold(total) == 0xFFFF


cdef inline uint64_t pseudo_header_sum(const uint8_t *ip, uint8_t proto,
                                       uint64_t l4_length) noexcept nogil:
    """Unfolded sum of the IPv4 pseudo-header (addresses of the header at ``ip``, protocol,
    L4 length) that TCP and UDP checksums start from (RFC 793 / RFC 768)."""
    return sum_bytes(ip + 12, 8) + proto + l4_length


cdef inline uint64_t pseudo_header_sum6(const uint8_t *ip6, uint8_t proto,
                                        uint64_t l4_length) noexcept nogil:
    """``pseudo_header_sum`` for IPv6 (RFC 8200 8.1): the addresses of the fixed header at
    ``ip6``, the upper-layer length and the next header value."""
    return sum_bytes(ip6 + 8, 32) + proto + l4_length
