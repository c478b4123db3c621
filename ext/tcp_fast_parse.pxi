# Guest TCP segments the fast path does not take, handed to the engine parsed (included by
# tcp_fast.pyx).
#
# ``take_batch`` walks every frame from the guest to the gateway anyway. A TCP segment it does
# not take in C (a SYN, the handshake's ACK, a FIN, a RST, a segment of a flow not registered)
# but whose headers it checked as the Python stack would (plain IPv4 or IPv6 from the guest's
# MAC to the gateway's, a header that verifies, TCP options that ``tcp_wire.parse_options``
# accepts, a flag combination ``TcpSegmentView`` accepts, a checksum that verifies or was left
# partial) is marked PARSED in ``handled`` and comes back as a ``ParsedSegment``: the engine
# takes it as it takes a ``TcpSegmentView`` (``TcpEngine.handle_segment``), without the wire
# views and the stack's per-layer dispatch. Anything else stays with the stack, which counts,
# logs and drops bad input as before. Only the families ``set_parse`` enables are parsed. The
# rules are those of the stack's view, declared in ext/tcp_segment.pxd.

from cpython.bytes cimport PyBytes_FromStringAndSize

cdef enum:
    HANDLED_NOT = 0      # for the stack
    HANDLED_TAKEN = 1    # taken in C
    HANDLED_PARSED = 2   # for the engine, as a ParsedSegment
    PARSE_IPV4 = 1
    PARSE_IPV6 = 2


cdef class ParsedSegment:
    """One guest TCP segment parsed in C: the fields ``TcpEngine`` reads from a
    ``TcpSegmentView`` (``options`` is the segment itself: ``mss``, ``wscale``,
    ``sack_permitted`` as in ``tcp_wire.TcpOptions``), its addresses and the frame's index in
    the batch. ``payload`` is a copy (the batch is reused)."""

    cdef readonly Py_ssize_t index
    cdef readonly bytes src
    cdef readonly bytes dst
    cdef readonly int src_port
    cdef readonly int dst_port
    cdef readonly uint32_t seq
    cdef readonly uint32_t ack
    cdef readonly int header_len
    cdef readonly int flags
    cdef readonly int window
    cdef readonly object mss
    cdef readonly object wscale
    cdef readonly bint sack_permitted
    cdef readonly bytes payload

    @property
    def options(self) -> ParsedSegment:
        return self

    @property
    def segment_len(self) -> int:
        """Sequence space the segment occupies: payload bytes plus one each for SYN and FIN."""
        return len(self.payload) + (self.flags & FLAG_SYN != 0) + (self.flags & FLAG_FIN != 0)


cdef ParsedSegment parsed_segment(Py_ssize_t index, const uint8_t *frame):
    """The segment of a frame ``take_batch`` marked PARSED (its headers were checked there)."""
    cdef ParsedSegment seg = ParsedSegment.__new__(ParsedSegment)
    cdef const uint8_t *ip = frame + ETH_LEN
    cdef const uint8_t *tcp
    cdef Py_ssize_t tcp_len, header_len
    cdef int mss, wscale
    cdef bint sack_permitted
    if frame[12] == 0x08:
        tcp = ip + IP_LEN
        tcp_len = be16(ip + 2) - IP_LEN
        seg.src = PyBytes_FromStringAndSize(<const char *>ip + 12, 4)
        seg.dst = PyBytes_FromStringAndSize(<const char *>ip + 16, 4)
    else:
        tcp = ip + IP6_LEN
        tcp_len = be16(ip + 4)
        seg.src = PyBytes_FromStringAndSize(<const char *>ip + 8, 16)
        seg.dst = PyBytes_FromStringAndSize(<const char *>ip + 24, 16)
    header_len = (tcp[12] >> 4) * 4
    seg.index = index
    seg.src_port = be16(tcp)
    seg.dst_port = be16(tcp + 2)
    seg.seq = be32(tcp + 4)
    seg.ack = be32(tcp + 8)
    seg.header_len = header_len
    seg.flags = tcp[13]
    seg.window = be16(tcp + 14)
    seg.payload = PyBytes_FromStringAndSize(<const char *>tcp + header_len, tcp_len - header_len)
    # The options were checked (options_valid): read them as tcp_wire.parse_options does.
    syn_options(tcp + TCP_LEN, header_len - TCP_LEN, &mss, &wscale, &sack_permitted)
    seg.sack_permitted = sack_permitted
    if mss >= 0:
        seg.mss = mss
    if wscale >= 0:
        seg.wscale = wscale
    return seg
