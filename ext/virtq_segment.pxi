# Offloads a switch destination did not negotiate, done in software (included by virtq.pyx,
# after frame_batch.pxi; used by virtq_switch.pxi).
#
# A guest's TX frame may carry a partial L4 checksum (NEEDS_CSUM) or be one TCP super-frame
# for the device to cut (GSO, 5.1.6.2), because *we* offered those offloads. Between two
# guests the frame goes to another guest's RX ring, which may not take them: its checksum
# is completed here, or it is cut into gso_size segments with every header rewritten, as
# Linux's skb_checksum_help and tcp_gso_segment do. The sums are netbytes.pxd's.

from netbytes cimport (be16, be32, checksum_field, pseudo_header_sum, pseudo_header_sum6, put16,
                       put32, sum_bytes)

cdef enum:
    ETHERTYPE_IPV4 = 0x0800
    ETHERTYPE_IPV6 = 0x86DD
    IPV6_HEADER_BYTES = 40
    PROTO_TCP = 6
    TCP_MIN_HEADER = 20
    TCP_FIN = 0x01
    TCP_PSH = 0x08
    TCP_CWR = 0x80

# What an offload fix came to.
cdef enum:
    FIX_OK = 0
    FIX_NO_ROOM          # the destination batch cannot take the result
    FIX_BAD_OFFLOAD      # the vnet word does not fit the frame
    FIX_GSO_UNSUPPORTED  # a GSO frame that is not plain TCP over IPv4/IPv6 behind Ethernet


cdef inline uint16_t l4_checksum_value(uint64_t total) noexcept nogil:
    """The checksum field for an unfolded sum; 0xFFFF for 0 (the same sum, and a UDP checksum
    of 0 would mean "none", RFC 768)."""
    cdef uint16_t value = checksum_field(total)
    return value if value else 0xFFFF


cdef int copy_completing_checksum(FrameBatch out, const uint8_t *frame, uint64_t length,
                                  VnetFields *fields) noexcept nogil:
    """Append ``frame`` to ``out`` with its partial checksum completed; vnet word 0."""
    cdef uint64_t start = fields.csum_start
    cdef uint64_t at = start + fields.csum_offset
    cdef uint8_t *copy
    if start < ETH_HEADER_BYTES or at + 2 > length:
        return FIX_BAD_OFFLOAD
    if not out.room_for(length):
        return FIX_NO_ROOM
    copy = out.data + out.fill
    memcpy(copy, frame, length)
    # The field holds the pseudo-header sum (virtio 5.1.6.2): summing from csum_start on
    # with it in place gives the whole checksum.
    put16(copy + at, l4_checksum_value(sum_bytes(copy + start, <Py_ssize_t>(length - start))))
    out.commit(<uint32_t>length, 0)
    return FIX_OK


cdef int segment_tcp(FrameBatch out, const uint8_t *frame, uint64_t length, VnetFields *fields,
                     uint64_t *segments) noexcept nogil:
    """Append the gso_size segments of TCP super-frame ``frame`` to ``out``, all or none.

    Each segment carries the Ethernet, IP and TCP headers of the super-frame with the IP
    length (IPv4 also the identification + segment number and the header checksum), the
    sequence number, the flags (FIN and PSH on the last segment only, CWR on the first only)
    and the TCP checksum rewritten; their vnet word is 0. ``segments`` gets their number.
    """
    cdef bint v4 = (fields.gso_type & ~VNET_GSO_ECN) == VNET_GSO_TCPV4
    cdef const uint8_t *ip = frame + ETH_HEADER_BYTES
    cdef uint64_t ip_header, l4, tcp_header, headers, payload, mss = fields.gso_size
    cdef uint64_t count, k, chunk, pseudo
    cdef uint32_t seq
    cdef uint16_t ident
    cdef uint8_t flags
    cdef uint8_t *seg
    cdef uint8_t *seg_ip
    cdef uint8_t *seg_tcp
    if v4:
        if length < ETH_HEADER_BYTES + 20 or be16(frame + 12) != ETHERTYPE_IPV4 or ip[0] >> 4 != 4:
            return FIX_GSO_UNSUPPORTED
        ip_header = <uint64_t>(ip[0] & 0x0F) * 4
        if ip_header < 20 or ip[9] != PROTO_TCP:
            return FIX_GSO_UNSUPPORTED
    else:
        if (length < ETH_HEADER_BYTES + IPV6_HEADER_BYTES or be16(frame + 12) != ETHERTYPE_IPV6
                or ip[0] >> 4 != 6 or ip[6] != PROTO_TCP):  # extension headers: not cut here
            return FIX_GSO_UNSUPPORTED
        ip_header = IPV6_HEADER_BYTES
    l4 = ETH_HEADER_BYTES + ip_header
    if length < l4 + TCP_MIN_HEADER or mss == 0:
        return FIX_BAD_OFFLOAD
    tcp_header = <uint64_t>(frame[l4 + 12] >> 4) * 4
    headers = l4 + tcp_header
    if tcp_header < TCP_MIN_HEADER or headers > length:
        return FIX_BAD_OFFLOAD
    payload = length - headers
    count = (payload + mss - 1) // mss if payload else 1
    if (out.n + <Py_ssize_t>count > out.capacity_frames
            or out.fill + count * headers + payload > <uint64_t>out.buffer_bytes):
        return FIX_NO_ROOM
    seq = be32(frame + l4 + 4)
    ident = be16(ip + 4)
    for k in range(count):
        chunk = mss if payload - k * mss > mss else payload - k * mss
        seg = out.data + out.fill
        memcpy(seg, frame, headers)
        memcpy(seg + headers, frame + headers + k * mss, chunk)
        seg_ip = seg + ETH_HEADER_BYTES
        seg_tcp = seg + l4
        if v4:
            put16(seg_ip + 2, ip_header + tcp_header + chunk)
            put16(seg_ip + 4, <uint16_t>(ident + k))
            put16(seg_ip + 10, 0)
            put16(seg_ip + 10, checksum_field(sum_bytes(seg_ip, <Py_ssize_t>ip_header)))
            pseudo = pseudo_header_sum(seg_ip, PROTO_TCP, tcp_header + chunk)
        else:
            put16(seg_ip + 4, tcp_header + chunk)
            pseudo = pseudo_header_sum6(seg_ip, PROTO_TCP, tcp_header + chunk)
        put32(seg_tcp + 4, <uint32_t>(seq + k * mss))
        flags = frame[l4 + 13]
        if k + 1 < count:
            flags &= ~(TCP_FIN | TCP_PSH)
        if k > 0:
            flags &= ~TCP_CWR
        seg_tcp[13] = flags
        put16(seg_tcp + 16, 0)
        put16(seg_tcp + 16, l4_checksum_value(
            pseudo + sum_bytes(seg_tcp, <Py_ssize_t>(tcp_header + chunk))))
        out.commit(<uint32_t>(headers + chunk), 0)
    segments[0] = count
    return FIX_OK
