# cython: language_level=3
"""The Internet checksum's one's complement sum, in C.

Called for every frame's IPv4 header and TCP/UDP segment; a Python or numpy
loop costs microseconds per call, this costs nanoseconds. The GIL is released
for large buffers only: for a 20-byte header the release costs more than the sum.
"""

from libc.stdint cimport uint8_t, uint64_t

cdef extern from "<string.h>":
    void *memcpy(void *dest, const void *src, size_t n) nogil

cdef extern from "<endian.h>":
    unsigned int be32toh(unsigned int) nogil


cdef inline uint64_t _sum(const uint8_t *data, Py_ssize_t length) noexcept nogil:
    # Sum big-endian 32-bit words into a 64-bit accumulator: no carry can be
    # lost below 2**32 words, far beyond any frame.
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


def ones_complement_sum(const uint8_t[::1] data not None, uint64_t initial=0):
    """Folded 16-bit one's complement sum of ``data`` plus ``initial``."""
    cdef Py_ssize_t length = data.shape[0]
    cdef uint64_t total
    if length == 0:
        total = initial
    elif length >= 4096:
        with nogil:
            total = initial + _sum(&data[0], length)
    else:
        total = initial + _sum(&data[0], length)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return <unsigned int>total
