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
from libc.string cimport memcpy

from netbytes cimport sum_bytes
from tcp_headers cimport (CSUM_FULL, CSUM_NONE, CSUM_PARTIAL, HDR_ETH_LEN, HDR_IP6_LEN,
                          HDR_IP_LEN, HDR_TCP_LEN, fill_headers, fill_template)


cdef enum:
    ETH_LEN = HDR_ETH_LEN
    IP_LEN = HDR_IP_LEN
    IP6_LEN = HDR_IP6_LEN
    TCP_LEN = HDR_TCP_LEN
    HEADERS = ETH_LEN + IP_LEN + TCP_LEN
    HEADERS6 = ETH_LEN + IP6_LEN + TCP_LEN

HEADERS_LEN = HEADERS
HEADERS6_LEN = HEADERS6
CHECKSUM_FULL = CSUM_FULL
CHECKSUM_PARTIAL = CSUM_PARTIAL
CHECKSUM_NONE = CSUM_NONE


cdef void fill_frame(uint8_t *out, Py_ssize_t ip_len, const uint8_t *template,
                     const uint8_t *payload, Py_ssize_t n, uint32_t seq, bint last,
                     int checksum) noexcept nogil:
    cdef Py_ssize_t headers = ETH_LEN + ip_len + TCP_LEN
    memcpy(out + headers, payload, n)
    fill_headers(out, ip_len, template, n, seq, last, checksum,
                 sum_bytes(payload, n) if checksum == CSUM_FULL else 0)


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


def control_frame(bytes dst_mac not None, bytes src_mac not None, bytes src_ip not None,
                  bytes dst_ip not None, int src_port, int dst_port, uint32_t seq, uint32_t ack,
                  int flags, int window, bytes options not None = b"") -> bytes:
    """One TCP segment without payload (ACK, FIN, RST, SYN...: ``flags``, the TCP flag byte)
    as a whole Ethernet frame, checksums complete; IPv4 or IPv6 by the addresses' length,
    headers as ``data_frames`` writes them. ``options``: the TCP options (a SYN's), already
    padded to whole 32-bit words (``wire.tcp.build_options``), at most 40 bytes."""
    cdef uint8_t template[HEADERS6]
    cdef Py_ssize_t ip_len = IP_LEN if len(src_ip) == 4 else IP6_LEN
    cdef Py_ssize_t options_len = len(options)
    cdef uint8_t *out
    if len(dst_mac) != 6 or len(src_mac) != 6 or len(src_ip) not in (4, 16) \
            or len(dst_ip) != len(src_ip):
        raise ValueError("MAC addresses must be 6 bytes and IP addresses 4 or 16, both alike")
    if not 0 <= src_port <= 0xFFFF or not 0 <= dst_port <= 0xFFFF or window < 0 \
            or not 0 <= flags <= 0xFF:
        raise ValueError("bad port, window or flags")
    if options_len % 4 or options_len > 40:
        raise ValueError("options must be whole 32-bit words, at most 40 bytes")
    fill_template(template, ip_len, <const uint8_t *>PyBytes_AS_STRING(dst_mac),
                  <const uint8_t *>PyBytes_AS_STRING(src_mac),
                  <const uint8_t *>PyBytes_AS_STRING(src_ip),
                  <const uint8_t *>PyBytes_AS_STRING(dst_ip), src_port, dst_port, ack,
                  window if window < 0xFFFF else 0xFFFF)
    frame = PyBytes_FromStringAndSize(NULL, ETH_LEN + ip_len + TCP_LEN + options_len)
    out = <uint8_t *>PyBytes_AS_STRING(frame)
    cdef const uint8_t *raw_options = <const uint8_t *>PyBytes_AS_STRING(options)
    # The options go where a payload would (lengths and checksums count them as one), then
    # the data offset takes them into the header.
    memcpy(out + ETH_LEN + ip_len + TCP_LEN, raw_options, options_len)
    fill_headers(out, ip_len, template, options_len, seq, False, CSUM_FULL,
                 sum_bytes(raw_options, options_len))
    set_offset_flags(out + ETH_LEN + ip_len, (TCP_LEN + options_len) // 4, flags)
    return frame


cdef inline void set_offset_flags(uint8_t *tcp, int offset_words, int flags) noexcept nogil:
    """Replace the data offset and flag byte ``fill_headers`` wrote (5 words, ACK) and fix
    the checksum (RFC 1624)."""
    cdef uint64_t old_word = (<uint64_t>tcp[12] << 8) | tcp[13]
    cdef uint64_t new_word = (<uint64_t>(offset_words << 4) << 8) | <uint8_t>flags
    cdef uint64_t check = (<uint64_t>tcp[16] << 8) | tcp[17]
    # HC' = ~(~HC + ~m + m'), in one's complement arithmetic over 16-bit words.
    cdef uint64_t total = (~check & 0xFFFF) + (~old_word & 0xFFFF) + new_word
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    total = ~total & 0xFFFF
    tcp[12] = <uint8_t>(offset_words << 4)
    tcp[13] = <uint8_t>flags
    tcp[16] = <uint8_t>(total >> 8)
    tcp[17] = <uint8_t>(total & 0xFF)
