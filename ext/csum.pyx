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
