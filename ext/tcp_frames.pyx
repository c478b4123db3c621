# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Host -> guest TCP data: complete Ethernet frames cut from a payload buffer, in one C pass.

The Python path built each segment in four layers (TCP header and checksum,
IPv4 header, Ethernet header, then the queue entry), copying the payload at
every step. Here each frame is one allocation: headers written in place, the
payload copied once, checksums (full, partial for GSO, or none for DATA_VALID)
computed while the GIL is released.

Both families: the addresses' length picks an IPv4 header (20 bytes, DF, TTL 64) or an
IPv6 one (40 bytes, hop limit 64) and the matching pseudo-header.

The Python face is ``vhostnet.tcp.frames`` (``data_frames``, ``L4Checksum``); use that.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

from netbytes cimport checksum_field, fold, pseudo_header_sum, put16, put32, sum_bytes


cdef enum:
    ETH_LEN = 14
    IP_LEN = 20
    IP6_LEN = 40
    TCP_LEN = 20
    HEADERS = ETH_LEN + IP_LEN + TCP_LEN
    HEADERS6 = ETH_LEN + IP6_LEN + TCP_LEN
    PROTO_TCP = 6
    FLAG_PSH = 0x08
    FLAG_ACK = 0x10
    # How the L4 checksum is left (the values of vhostnet.wire.tcp's CSUM_*).
    CSUM_FULL = 0         # computed
    CSUM_PARTIAL = 1      # the pseudo-header sum only (virtio NEEDS_CSUM; the guest completes it)
    CSUM_NONE = 2         # zero (virtio DATA_VALID)

HEADERS_LEN = HEADERS
HEADERS6_LEN = HEADERS6
CHECKSUM_FULL = CSUM_FULL
CHECKSUM_PARTIAL = CSUM_PARTIAL
CHECKSUM_NONE = CSUM_NONE


cdef void fill_template(uint8_t *out, Py_ssize_t ip_len, const uint8_t *dst_mac,
                        const uint8_t *src_mac, const uint8_t *src_ip, const uint8_t *dst_ip,
                        uint64_t src_port, uint64_t dst_port, uint32_t ack,
                        uint64_t window) noexcept nogil:
    """The headers every frame shares: lengths, sequence number, flags and checksums stay 0.
    ``ip_len`` is IP_LEN (IPv4, 4-byte addresses) or IP6_LEN (IPv6, 16-byte addresses)."""
    cdef uint8_t *ip = out + ETH_LEN
    cdef uint8_t *tcp = ip + ip_len
    memset(out, 0, ETH_LEN + ip_len + TCP_LEN)
    memcpy(out, dst_mac, 6)
    memcpy(out + 6, src_mac, 6)
    if ip_len == IP_LEN:
        put16(out + 12, 0x0800)
        ip[0] = 0x45
        put16(ip + 6, 0x4000)   # DF: the identification means nothing (RFC 6864)
        ip[8] = 64              # TTL
        ip[9] = PROTO_TCP
        memcpy(ip + 12, src_ip, 4)
        memcpy(ip + 16, dst_ip, 4)
    else:
        put16(out + 12, 0x86DD)
        ip[0] = 0x60            # version 6, traffic class and flow label 0
        ip[6] = PROTO_TCP       # next header
        ip[7] = 64              # hop limit
        memcpy(ip + 8, src_ip, 16)
        memcpy(ip + 24, dst_ip, 16)
    put16(tcp, src_port)
    put16(tcp + 2, dst_port)
    put32(tcp + 8, ack)
    tcp[12] = (TCP_LEN // 4) << 4
    put16(tcp + 14, window)


cdef void fill_frame(uint8_t *out, Py_ssize_t ip_len, const uint8_t *template,
                     const uint8_t *payload, Py_ssize_t n, uint32_t seq, bint last,
                     int checksum) noexcept nogil:
    cdef uint64_t tcp_len = TCP_LEN + n
    cdef uint8_t *ip = out + ETH_LEN
    cdef uint8_t *tcp = ip + ip_len
    cdef Py_ssize_t headers = ETH_LEN + ip_len + TCP_LEN
    cdef uint64_t total
    memcpy(out, template, headers)
    memcpy(out + headers, payload, n)
    if ip_len == IP_LEN:
        put16(ip + 2, IP_LEN + tcp_len)
        put16(ip + 10, checksum_field(sum_bytes(ip, IP_LEN)))
        total = pseudo_header_sum(ip, PROTO_TCP, tcp_len)
    else:
        put16(ip + 4, tcp_len)  # IPv6 payload length: no header checksum
        total = sum_bytes(ip + 8, 32) + PROTO_TCP + tcp_len  # RFC 8200 8.1 pseudo-header
    put32(tcp + 4, seq)
    tcp[13] = (FLAG_ACK | FLAG_PSH) if last else FLAG_ACK
    if checksum == CSUM_FULL:
        put16(tcp + 16, checksum_field(total + sum_bytes(tcp, tcp_len)))
    elif checksum == CSUM_PARTIAL:
        put16(tcp + 16, fold(total))


def data_frames(bytes dst_mac not None, bytes src_mac not None, bytes src_ip not None,
                bytes dst_ip not None, int src_port, int dst_port, uint32_t seq, uint32_t ack,
                int window, const uint8_t[::1] data, Py_ssize_t seg_size, int checksum) -> list:
    """Frames carrying ``data`` in segments of at most ``seg_size`` bytes, the first at ``seq``.

    Every segment is ACK (PSH on the last) with ``ack`` and ``window`` (clamped to 0xFFFF),
    in an IPv4 packet (TTL 64, DF) or an IPv6 one (hop limit 64; 16-byte addresses) in an
    Ethernet frame. ``checksum``: CHECKSUM_FULL, CHECKSUM_PARTIAL (pseudo-header sum, for
    NEEDS_CSUM) or CHECKSUM_NONE (DATA_VALID).
    """
    cdef uint8_t template[HEADERS6]
    cdef Py_ssize_t ip_len = IP_LEN if len(src_ip) == 4 else IP6_LEN
    if len(dst_mac) != 6 or len(src_mac) != 6 or len(src_ip) not in (4, 16) \
            or len(dst_ip) != len(src_ip):
        raise ValueError("MAC addresses must be 6 bytes and IP addresses 4 or 16, both alike")
    if not 0 <= src_port <= 0xFFFF or not 0 <= dst_port <= 0xFFFF or window < 0:
        raise ValueError("bad port or window")
    if checksum != CSUM_FULL and checksum != CSUM_PARTIAL and checksum != CSUM_NONE:
        raise ValueError(f"bad checksum mode {checksum}")
    if seg_size <= 0 or seg_size > 0xFFFF - IP_LEN - TCP_LEN:
        raise ValueError("bad segment size")
    fill_template(template, ip_len, <const uint8_t *>PyBytes_AS_STRING(dst_mac),
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
        frame = PyBytes_FromStringAndSize(NULL, ETH_LEN + ip_len + TCP_LEN + n)
        out = <uint8_t *>PyBytes_AS_STRING(frame)
        with nogil:
            fill_frame(out, ip_len, template, &data[start], n, <uint32_t>(seq + start),
                       start + n >= length, checksum)
        frames.append(frame)
        start += n
    return frames
