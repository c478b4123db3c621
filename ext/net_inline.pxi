# Small byte-order and checksum helpers shared by the Cython kernels
# that read and write packets (included textually: `include "net_inline.pxi"`).
# Everything here is inline and GIL-free.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

cdef extern from "<endian.h>" nogil:
    unsigned int be32toh(unsigned int)


cdef inline uint16_t be16(const uint8_t *p) noexcept nogil:
    return (<uint16_t>p[0] << 8) | p[1]


cdef inline uint32_t be32(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline void put16(uint8_t *p, uint64_t v) noexcept nogil:
    p[0] = (v >> 8) & 0xFF
    p[1] = v & 0xFF


cdef inline void put32(uint8_t *p, uint64_t v) noexcept nogil:
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
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return <uint16_t>total
