# The rules of vhostnet.wire.tcp's checked view (TcpSegmentView, parse_options) for a guest TCP
# segment, in C, for the fast path's pass over a TX batch (tcp_fast.pyx): a segment these accept
# is one the view accepts, read the same way. Both must change together
# (tests/tcp/test_tcp_parsed.py holds them to it).
#
# Compile-time only (inline, GIL-free).

from libc.stdint cimport uint8_t

from netbytes cimport be16

cdef enum:
    SEG_FIN = 0x01
    SEG_SYN = 0x02
    SEG_RST = 0x04
    SEG_ACK = 0x10
    SEG_MAX_WSCALE = 14      # RFC 7323 (tcp_wire.MAX_WSCALE): larger shifts count as 14


cdef inline bint flags_valid(uint8_t flags) noexcept nogil:
    """``TcpSegmentView``'s rule: not two of SYN, FIN and RST; at least one of SYN, RST, ACK."""
    cdef uint8_t both = flags & (SEG_SYN | SEG_FIN | SEG_RST)
    return (both & (both - 1)) == 0 and (flags & (SEG_SYN | SEG_RST | SEG_ACK)) != 0


cdef inline bint options_valid(const uint8_t *opt, size_t end) noexcept nogil:
    """The rules of ``tcp_wire.parse_options``: what it refuses, the engine drops."""
    cdef size_t index = 0, length
    cdef uint8_t kind
    while index < end:
        kind = opt[index]
        if kind == 0:
            return True
        if kind == 1:
            index += 1
            continue
        if index + 1 >= end:
            return False
        length = opt[index + 1]
        if length < 2 or index + length > end:
            return False
        if (kind == 2 and length != 4) or (kind == 3 and length != 3) or (kind == 4 and length != 2):
            return False
        index += length
    return True


cdef inline bint has_sack(const uint8_t *opt, size_t end) noexcept nogil:
    """A SACK option (kind 5) among valid options (``options_valid`` said so)."""
    cdef size_t index = 0
    while index < end and opt[index] != 0:
        if opt[index] == 1:
            index += 1
            continue
        if opt[index] == 5:
            return True
        index += opt[index + 1]
    return False


cdef inline void syn_options(const uint8_t *opt, size_t end, int *mss, int *wscale,
                             bint *sack_permitted) noexcept nogil:
    """The options the engine acts on, from valid options (``options_valid`` said so), as
    ``tcp_wire.parse_options`` reads them: -1 for an MSS or window scale not present."""
    cdef size_t index = 0
    cdef uint8_t kind
    mss[0] = -1
    wscale[0] = -1
    sack_permitted[0] = False
    while index < end:
        kind = opt[index]
        if kind == 0:
            return
        if kind == 1:
            index += 1
            continue
        if kind == 2:
            mss[0] = be16(opt + index + 2)
        elif kind == 3:
            wscale[0] = opt[index + 2] if opt[index + 2] < SEG_MAX_WSCALE else SEG_MAX_WSCALE
        elif kind == 4:
            sack_permitted[0] = True
        index += opt[index + 1]
