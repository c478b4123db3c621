# The Ethernet/IP/TCP headers of a host -> guest TCP data frame, for the two kernels that build
# them: tcp_frames.pyx (whole frames in a buffer) and tcp_fast.pyx (headers in front of payload
# peeked straight into the guest's RX buffers). IPv4 (20-byte header, DF, TTL 64) or IPv6
# (40 bytes, hop limit 64), TCP without options, ACK (PSH on a call's last segment).
#
# Compile-time only (inline, GIL-free).

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

from netbytes cimport checksum_field, fold, pseudo_header_sum, put16, put32, sum_bytes

cdef enum:
    HDR_ETH_LEN = 14
    HDR_IP_LEN = 20
    HDR_IP6_LEN = 40
    HDR_TCP_LEN = 20
    HDR_PROTO_TCP = 6
    HDR_FLAG_PSH = 0x08
    HDR_FLAG_ACK = 0x10
    HEADERS_MAX = HDR_ETH_LEN + HDR_IP6_LEN + HDR_TCP_LEN
    # How the L4 checksum is left (the values of vhostnet.wire.tcp's CSUM_*).
    CSUM_FULL = 0         # computed
    CSUM_PARTIAL = 1      # the pseudo-header sum only (virtio NEEDS_CSUM; the guest completes it)
    CSUM_NONE = 2         # zero (virtio DATA_VALID)


cdef inline void fill_template(uint8_t *out, Py_ssize_t ip_len, const uint8_t *dst_mac,
                               const uint8_t *src_mac, const uint8_t *src_ip,
                               const uint8_t *dst_ip, uint64_t src_port, uint64_t dst_port,
                               uint32_t ack, uint64_t window) noexcept nogil:
    """The headers every frame shares: lengths, sequence number, flags and checksums stay 0.
    ``ip_len`` is HDR_IP_LEN (IPv4, 4-byte addresses) or HDR_IP6_LEN (IPv6, 16-byte ones)."""
    cdef uint8_t *ip = out + HDR_ETH_LEN
    cdef uint8_t *tcp = ip + ip_len
    memset(out, 0, HDR_ETH_LEN + ip_len + HDR_TCP_LEN)
    memcpy(out, dst_mac, 6)
    memcpy(out + 6, src_mac, 6)
    if ip_len == HDR_IP_LEN:
        put16(out + 12, 0x0800)
        ip[0] = 0x45
        put16(ip + 6, 0x4000)   # DF: the identification means nothing (RFC 6864)
        ip[8] = 64              # TTL
        ip[9] = HDR_PROTO_TCP
        memcpy(ip + 12, src_ip, 4)
        memcpy(ip + 16, dst_ip, 4)
    else:
        put16(out + 12, 0x86DD)
        ip[0] = 0x60            # version 6, traffic class and flow label 0
        ip[6] = HDR_PROTO_TCP   # next header
        ip[7] = 64              # hop limit
        memcpy(ip + 8, src_ip, 16)
        memcpy(ip + 24, dst_ip, 16)
    put16(tcp, src_port)
    put16(tcp + 2, dst_port)
    put32(tcp + 8, ack)
    tcp[12] = (HDR_TCP_LEN // 4) << 4
    put16(tcp + 14, window)


cdef inline void fill_headers(uint8_t *out, Py_ssize_t ip_len, const uint8_t *template,
                              uint64_t n, uint32_t seq, bint last, int checksum,
                              uint64_t payload_sum) noexcept nogil:
    """The headers of one frame with ``n`` payload bytes whose unfolded sum is ``payload_sum``
    (only read for CSUM_FULL), from ``template`` (``fill_template``)."""
    cdef uint64_t tcp_len = HDR_TCP_LEN + n
    cdef uint8_t *ip = out + HDR_ETH_LEN
    cdef uint8_t *tcp = ip + ip_len
    cdef uint64_t total
    memcpy(out, template, HDR_ETH_LEN + ip_len + HDR_TCP_LEN)
    if ip_len == HDR_IP_LEN:
        put16(ip + 2, HDR_IP_LEN + tcp_len)
        put16(ip + 10, checksum_field(sum_bytes(ip, HDR_IP_LEN)))
        total = pseudo_header_sum(ip, HDR_PROTO_TCP, tcp_len)
    else:
        put16(ip + 4, tcp_len)  # IPv6 payload length: no header checksum
        total = sum_bytes(ip + 8, 32) + HDR_PROTO_TCP + tcp_len  # RFC 8200 8.1 pseudo-header
    put32(tcp + 4, seq)
    tcp[13] = (HDR_FLAG_ACK | HDR_FLAG_PSH) if last else HDR_FLAG_ACK
    if checksum == CSUM_FULL:
        put16(tcp + 16, checksum_field(total + sum_bytes(tcp, HDR_TCP_LEN) + payload_sum))
    elif checksum == CSUM_PARTIAL:
        put16(tcp + 16, fold(total))
