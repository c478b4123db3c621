# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Host -> guest TCP data: complete Ethernet frames cut from a payload buffer, in one C pass.

The Python path built each segment in four layers (TCP header and checksum,
IPv4 header, Ethernet header, then the queue entry), copying the payload at
every step. Here each frame is one allocation: headers written in place, the
payload copied once, checksums (full, partial for GSO, or none for DATA_VALID)
computed while the GIL is released.

The Python face is ``NetworkStack.send_tcp_data``.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy

include "net_inline.pxi"


cdef enum:
    HEADERS = 54          # Ethernet 14 + IPv4 20 + TCP 20
    CSUM_FULL = 0
    CSUM_PARTIAL = 1
    CSUM_NONE = 2


cdef void fill_frame(uint8_t *out, const uint8_t *template, const uint8_t *payload, Py_ssize_t n,
                     uint32_t seq, bint last, int checksum) noexcept nogil:
    cdef uint64_t tcp_len = 20 + n
    cdef uint8_t *ip = out + 14
    cdef uint8_t *tcp = out + 34
    cdef uint64_t total
    memcpy(out, template, HEADERS)
    memcpy(out + HEADERS, payload, n)
    put16(ip + 2, 20 + tcp_len)
    put16(ip + 10, 0)
    put16(ip + 10, (~fold(sum_bytes(ip, 20))) & 0xFFFF)
    put32(tcp + 4, seq)
    tcp[13] = 0x18 if last else 0x10  # ACK, plus PSH on the last segment
    put16(tcp + 16, 0)
    # Pseudo-header: addresses, protocol, TCP length.
    total = sum_bytes(ip + 12, 8) + 6 + tcp_len
    if checksum == CSUM_FULL:
        total += sum_bytes(tcp, tcp_len)
        put16(tcp + 16, (~fold(total)) & 0xFFFF)
    elif checksum == CSUM_PARTIAL:
        put16(tcp + 16, fold(total))


def data_frames(bytes template not None, const uint8_t[::1] data, uint32_t seq, Py_ssize_t seg_size,
                int checksum) -> list:
    """Frames carrying ``data`` in segments of at most ``seg_size`` bytes, the first at ``seq``.

    ``template`` is 54 bytes: Ethernet, IPv4 (addresses, TTL, DF) and TCP (ports, ack,
    window) headers; lengths, sequence numbers, flags and checksums are filled here.
    ``checksum``: 0 full, 1 partial (pseudo-header sum, for NEEDS_CSUM), 2 none (DATA_VALID).
    """
    if len(template) != HEADERS:
        raise ValueError("the header template must be 54 bytes")
    if seg_size <= 0 or seg_size > 0xFFFF - 40:
        raise ValueError("bad segment size")
    cdef Py_ssize_t length = data.shape[0]
    cdef Py_ssize_t start = 0, n
    cdef const uint8_t *tmpl = <const uint8_t *>PyBytes_AS_STRING(template)
    cdef uint8_t *out
    frames = []
    while start < length:
        n = length - start
        if n > seg_size:
            n = seg_size
        frame = PyBytes_FromStringAndSize(NULL, HEADERS + n)
        out = <uint8_t *>PyBytes_AS_STRING(frame)
        with nogil:
            fill_frame(out, tmpl, &data[start], n, <uint32_t>(seq + start), start + n >= length,
                       checksum)
        frames.append(frame)
        start += n
    return frames
