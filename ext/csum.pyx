# cython: language_level=3
"""The Internet checksum's one's complement sum, in C: Python's door to ext/netbytes.pxd.

Called for every frame's IPv4 header and TCP/UDP segment; a Python or numpy
loop costs microseconds per call, this costs nanoseconds. The GIL is released
for large buffers only: for a 20-byte header the release costs more than the sum.
"""

from libc.stdint cimport uint8_t, uint64_t

from netbytes cimport fold, sum_bytes


def ones_complement_sum(const uint8_t[::1] data not None, uint64_t initial=0):
    """Folded 16-bit one's complement sum of ``data`` plus ``initial``."""
    cdef Py_ssize_t length = data.shape[0]
    cdef uint64_t total
    if length == 0:
        total = initial
    elif length >= 4096:
        with nogil:
            total = initial + sum_bytes(&data[0], length)
    else:
        total = initial + sum_bytes(&data[0], length)
    return fold(total)


def l4_sum_verifies(bytes src not None, bytes dst not None, unsigned int proto,
                    const uint8_t[::1] segment not None):
    """Whether a received TCP/UDP ``segment`` (its checksum field included) verifies over
    the pseudo-header of ``src`` and ``dst`` (4 or 16 bytes each: either family). One call
    for what took four in Python (the pseudo-header sum, a buffer check, the sum, the test):
    run for every guest segment the fast paths leave to the engines."""
    cdef Py_ssize_t length = segment.shape[0]
    # The pseudo-header's length word: 16 bits (IPv4) or 32 (IPv6); added whole either way,
    # since folding is arithmetic modulo 0xFFFF.
    cdef uint64_t total = proto + <uint64_t>length
    total += sum_bytes(<const uint8_t *>src, len(src)) + sum_bytes(<const uint8_t *>dst, len(dst))
    if length:
        total += sum_bytes(&segment[0], length)
    return fold(total) == 0xFFFF
