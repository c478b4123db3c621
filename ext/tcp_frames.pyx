# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Host -> guest TCP data: complete Ethernet frames cut from a payload buffer, in one C pass.

The Python path built each segment in four layers (TCP header and checksum,
IPv4 header, Ethernet header, then the queue entry), copying the payload at
every step. Here each frame is one allocation: headers written in place, the
payload copied once, checksums (full, partial for GSO, or none for DATA_VALID)
computed while the GIL is released.

The Python face is ``vhostnet.tcp.frames`` (``data_frames``, ``L4Checksum``); use that.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

from netbytes cimport checksum_field, fold, pseudo_header_sum, put16, put32, sum_bytes


cdef enum:
    ETH_LEN = 14
    IP_LEN = 20
    TCP_LEN = 20
    HEADERS = ETH_LEN + IP_LEN + TCP_LEN
    PROTO_TCP = 6
    FLAG_PSH = 0x08
    FLAG_ACK = 0x10
    # How the L4 checksum is left (the values of vhostnet.wire.tcp's CSUM_*).
    CSUM_FULL = 0         # computed
    CSUM_PARTIAL = 1      # the pseudo-header sum only (virtio NEEDS_CSUM; the guest completes it)
    CSUM_NONE = 2         # zero (virtio DATA_VALID)

HEADERS_LEN = HEADERS
CHECKSUM_FULL = CSUM_FULL
CHECKSUM_PARTIAL = CSUM_PARTIAL
CHECKSUM_NONE = CSUM_NONE


cdef void fill_template(uint8_t *out, const uint8_t *dst_mac, const uint8_t *src_mac,
                        const uint8_t *src_ip, const uint8_t *dst_ip, uint64_t src_port,
                        uint64_t dst_port, uint32_t ack, uint64_t window) noexcept nogil:
    """The headers every frame shares: lengths, sequence number, flags and checksums stay 0."""
    cdef uint8_t *ip = out + ETH_LEN
    cdef uint8_t *tcp = ip + IP_LEN
    memset(out, 0, HEADERS)
    memcpy(out, dst_mac, 6)
    memcpy(out + 6, src_mac, 6)
    put16(out + 12, 0x0800)
    ip[0] = 0x45
    put16(ip + 6, 0x4000)   # DF: the identification means nothing (RFC 6864)
    ip[8] = 64              # TTL
    ip[9] = PROTO_TCP
    memcpy(ip + 12, src_ip, 4)
    memcpy(ip + 16, dst_ip, 4)
    put16(tcp, src_port)
    put16(tcp + 2, dst_port)
    put32(tcp + 8, ack)
    tcp[12] = (TCP_LEN // 4) << 4
    put16(tcp + 14, window)


cdef void fill_frame(uint8_t *out, const uint8_t *template, const uint8_t *payload, Py_ssize_t n,
                     uint32_t seq, bint last, int checksum) noexcept nogil:
    cdef uint64_t tcp_len = TCP_LEN + n
    cdef uint8_t *ip = out + ETH_LEN
    cdef uint8_t *tcp = ip + IP_LEN
    cdef uint64_t total
    memcpy(out, template, HEADERS)
    memcpy(out + HEADERS, payload, n)
    put16(ip + 2, IP_LEN + tcp_len)
    put16(ip + 10, checksum_field(sum_bytes(ip, IP_LEN)))
    put32(tcp + 4, seq)
    tcp[13] = (FLAG_ACK | FLAG_PSH) if last else FLAG_ACK
    total = pseudo_header_sum(ip, PROTO_TCP, tcp_len)
    if checksum == CSUM_FULL:
        put16(tcp + 16, checksum_field(total + sum_bytes(tcp, tcp_len)))
    elif checksum == CSUM_PARTIAL:
        put16(tcp + 16, fold(total))


def data_frames(bytes dst_mac not None, bytes src_mac not None, bytes src_ip not None,
                bytes dst_ip not None, int src_port, int dst_port, uint32_t seq, uint32_t ack,
                int window, const uint8_t[::1] data, Py_ssize_t seg_size, int checksum) -> list:
    """Frames carrying ``data`` in segments of at most ``seg_size`` bytes, the first at ``seq``.

    Every segment is ACK (PSH on the last) with ``ack`` and ``window`` (clamped to 0xFFFF),
    in an IPv4 packet (TTL 64, DF) in an Ethernet frame. ``checksum``: CHECKSUM_FULL,
    CHECKSUM_PARTIAL (pseudo-header sum, for NEEDS_CSUM) or CHECKSUM_NONE (DATA_VALID).
    """
    cdef uint8_t template[HEADERS]
    if len(dst_mac) != 6 or len(src_mac) != 6 or len(src_ip) != 4 or len(dst_ip) != 4:
        raise ValueError("MAC addresses must be 6 bytes and IPv4 addresses 4")
    if not 0 <= src_port <= 0xFFFF or not 0 <= dst_port <= 0xFFFF or window < 0:
        raise ValueError("bad port or window")
    if checksum != CSUM_FULL and checksum != CSUM_PARTIAL and checksum != CSUM_NONE:
        raise ValueError(f"bad checksum mode {checksum}")
    if seg_size <= 0 or seg_size > 0xFFFF - IP_LEN - TCP_LEN:
        raise ValueError("bad segment size")
    fill_template(template, <const uint8_t *>PyBytes_AS_STRING(dst_mac),
                  <const uint8_t *>PyBytes_AS_STRING(src_mac),
                  <const uint8_t *>PyBytes_AS_STRING(src_ip),
                  <const uint8_t *>PyBytes_AS_STRING(dst_ip), src_port, dst_port, ack,
                  window if window < 0xFFFF else 0xFFFF)
    cdef Py_ssize_t length = data.shape[0]
    cdef Py_ssize_t start = 0, n
    cdef uint8_t *out
    frames = []
    while start < length:
        n = length - start
        if n > seg_size:
            n = seg_size
        frame = PyBytes_FromStringAndSize(NULL, HEADERS + n)
        out = <uint8_t *>PyBytes_AS_STRING(frame)
        with nogil:
            fill_frame(out, template, &data[start], n, <uint32_t>(seq + start), start + n >= length,
                       checksum)
        frames.append(frame)
        start += n
    return frames
