# Host -> guest UDP frames (included by udp_fast.pyx): the headers of a flow's datagram, built
# in a FrameBatch (``build_frame``) or straight in the guest's RX buffers (``direct_receive``).
#
# Direct: the datagrams waiting on a connected flow socket are received (recvmmsg, two at a
# time) into the RX buffers the ring kernel hands out (ext/rx_direct.pxd), past room for the
# virtio-net, Ethernet, IP and UDP headers, which are written after with the UDP checksum
# computed over the payload where it lies; one interrupt for the whole call. The first of
# each two lands in the buffers (one copy, the kernel's); the second, if one waited, in the
# spill buffer, copied into buffers of its own after: a round that brings fewer than asked
# tells the socket is drained, with no receive more that fails with EAGAIN (one syscall per
# request/response instead of two). A datagram the room cannot hold (over the MTU, or the
# ring short of buffers) lands whole in the spill buffer and goes back to Python (with the
# one after it, if it came), and the call stops there: what follows is read the old way,
# behind it, so nothing is lost or reordered.

from libc.errno cimport EFAULT
from cpython.pycapsule cimport PyCapsule_GetContext, PyCapsule_GetPointer
from rx_direct cimport RXD_MAX_SPANS, RxDirectApi, RxRoom, iov_sum, room_payload_iov
from sockets cimport recvmmsg

cdef enum:
    HEADERS_MAX = ETH_LEN + IP6_LEN + UDP_LEN
    SPILL_HALF = 65536           # no datagram is longer: what the room misses fits behind it
    SPILL_NEXT = 2 * SPILL_HALF  # where recvmmsg puts the datagram after the room's
    SPILL_SIZE = 3 * SPILL_HALF
    # How a direct receive ended (the first value of ``receive_direct``); positive: an errno.
    UDP_DIRECT_DRAINED = 0       # the socket is empty
    UDP_DIRECT_LIMIT = -1        # ``limit`` datagrams went: more may wait
    UDP_DIRECT_RING_FULL = -2    # no RX buffer (or the ring refused): the rest the old way
    UDP_DIRECT_SPILLED = -3      # one datagram did not fit its room: handed back, then the old way

DIRECT_DRAINED = UDP_DIRECT_DRAINED
DIRECT_LIMIT = UDP_DIRECT_LIMIT
DIRECT_RING_FULL = UDP_DIRECT_RING_FULL
DIRECT_SPILLED = UDP_DIRECT_SPILLED


cdef uint64_t build_headers(const uint8_t *guest_mac, const uint8_t *gateway_mac,
                            const FlowSlot *slot, uint8_t *frame, uint32_t length) noexcept nogil:
    """Ethernet + IP + UDP headers at ``frame`` for a ``length``-byte payload from the flow's
    remote end to the guest (IPv4's checksum filled in, UDP's zero); returns the unfolded sum
    of the UDP pseudo-header and header, to which the payload's sum is added."""
    cdef uint8_t *ip = frame + ETH_LEN
    cdef uint8_t *udp
    cdef uint64_t total
    memcpy(frame, guest_mac, 6)
    memcpy(frame + 6, gateway_mac, 6)
    if slot.ipv6:
        frame[12] = 0x86
        frame[13] = 0xDD
        udp = ip + IP6_LEN
        ip[0] = 0x60
        ip[1] = ip[2] = ip[3] = 0
        put16(ip + 4, UDP_LEN + length)
        ip[6] = PROTO_UDP
        ip[7] = TTL
        memcpy(ip + 8, slot.remote_ip, 16)
        memcpy(ip + 24, slot.guest_ip, 16)
        total = pseudo_header_sum6(ip, PROTO_UDP, UDP_LEN + length)
    else:
        frame[12] = 0x08
        frame[13] = 0x00
        udp = ip + IP_LEN
        ip[0] = 0x45
        ip[1] = 0
        put16(ip + 2, IP_LEN + UDP_LEN + length)
        ip[4] = ip[5] = 0
        ip[6] = 0x40  # DF: identification 0 (RFC 6864), as emit_ipv4_header
        ip[7] = 0
        ip[8] = TTL
        ip[9] = PROTO_UDP
        ip[10] = ip[11] = 0
        memcpy(ip + 12, slot.remote_ip, 4)
        memcpy(ip + 16, slot.guest_ip, 4)
        put16(ip + 10, checksum_field(sum_bytes(ip, IP_LEN)))
        total = pseudo_header_sum(ip, PROTO_UDP, UDP_LEN + length)
    memcpy(udp, slot.remote_port, 2)
    memcpy(udp + 2, slot.guest_port, 2)
    put16(udp + 4, UDP_LEN + length)
    udp[6] = udp[7] = 0
    return total + sum_bytes(udp, UDP_LEN)


cdef inline void put_udp_checksum(uint8_t *udp, uint64_t total) noexcept nogil:
    """The UDP checksum from the whole sum (a computed 0 sent as 0xFFFF)."""
    total = checksum_field(total)
    put16(udp + 6, total if total else 0xFFFF)


cdef void build_frame(const uint8_t *guest_mac, const uint8_t *gateway_mac, const FlowSlot *slot,
                      uint8_t *frame, const uint8_t *payload, uint32_t length) noexcept nogil:
    """The whole frame at ``frame``: headers, then the payload, checksums filled in."""
    cdef uint64_t total = build_headers(guest_mac, gateway_mac, slot, frame, length)
    cdef uint8_t *udp = frame + ETH_LEN + (IP6_LEN if slot.ipv6 else IP_LEN)
    memcpy(udp + UDP_LEN, payload, length)
    put_udp_checksum(udp, total + sum_bytes(udp + UDP_LEN, length))


cdef struct UdpDirect:
    const RxDirectApi *api
    int fd
    const FlowSlot *slot
    const uint8_t *guest_mac
    const uint8_t *gateway_mac
    uint64_t max_payload         # the longest payload one frame of the MTU carries
    uint64_t vnet                # the frames' vnet word (UdpFastPath.data_valid)
    uint8_t *spill               # SPILL_SIZE bytes (see SPILL_NEXT)
    long limit
    # results
    long frames
    int status
    uint64_t spilled_at          # the handed-back datagram: spill[spilled_at:+spilled_len]
    uint64_t spilled_len
    uint64_t next_len            # and the one after it, handed back too: at SPILL_NEXT (0: none)


cdef bint direct_commit(UdpDirect *p, void *ring, RxRoom *room, uint32_t headers_len,
                        uint64_t length, uint64_t payload_sum) noexcept nogil:
    """The frame of a ``length``-byte payload already in ``room`` (its sum given): headers
    written, checksum filled in, completed; False if the ring refused it."""
    cdef uint8_t headers[HEADERS_MAX]
    cdef uint64_t total = build_headers(p.guest_mac, p.gateway_mac, p.slot, headers,
                                        <uint32_t>length)
    put_udp_checksum(headers + headers_len - UDP_LEN, total + payload_sum)
    return p.api.commit(ring, room, headers, headers_len, p.vnet, headers_len + length) == 0


cdef bint direct_copy_next(UdpDirect *p, void *ring, uint32_t headers_len) noexcept nogil:
    """The datagram recvmmsg put at SPILL_NEXT, copied into RX buffers of its own; False
    when it cannot go there (over the MTU, the ring short of buffers, refused)."""
    cdef RxRoom room
    cdef iovec iov[RXD_MAX_SPANS]
    cdef const uint8_t *source = p.spill + SPILL_NEXT
    cdef uint64_t length = p.next_len, needed, done = 0
    cdef int niov, k
    if length > p.max_payload:
        return False
    needed = 12 + headers_len + length
    if not p.api.take(ring, needed, needed, &room):
        return False
    if room_payload_iov(&room, room.hdr_len + headers_len, length, iov, &niov) < length:
        return False
    for k in range(niov):
        memcpy(iov[k].iov_base, source + done, iov[k].iov_len)
        done += iov[k].iov_len
    return direct_commit(p, ring, &room, headers_len, length, sum_bytes(source, length))


cdef long udp_direct_work(void *ring, void *arg, long unused) noexcept nogil:
    """Rounds of recvmmsg for two datagrams: the first into the RX buffers taken for it, the
    second (if one waits) behind, copied into buffers of its own after; fewer than asked
    means the socket is drained, with no receive more to learn it."""
    cdef UdpDirect *p = <UdpDirect *>arg
    cdef RxRoom room
    cdef iovec iov[RXD_MAX_SPANS + 1]
    cdef iovec next_iov
    cdef mmsghdr msgs[2]
    cdef uint32_t headers_len = ETH_LEN + UDP_LEN + (IP6_LEN if p.slot.ipv6 else IP_LEN)
    cdef uint64_t skip, want, covered, total, got
    cdef int niov, k, attempts, got_count, asked
    p.status = UDP_DIRECT_LIMIT
    while p.frames < p.limit:
        if not p.api.take(ring, 12 + headers_len + p.max_payload, 12 + headers_len, &room):
            p.status = UDP_DIRECT_RING_FULL
            return 0
        skip = room.hdr_len + headers_len
        want = room.capacity - skip
        if want > p.max_payload:
            want = p.max_payload
        covered = room_payload_iov(&room, skip, want, iov, &niov)
        # Whatever the room misses lands behind it, so the datagram is never cut short.
        iov[niov].iov_base = p.spill + SPILL_HALF
        iov[niov].iov_len = SPILL_HALF
        next_iov.iov_base = p.spill + SPILL_NEXT
        next_iov.iov_len = SPILL_HALF
        memset(msgs, 0, sizeof(msgs))
        msgs[0].msg_hdr.msg_iov = iov
        msgs[0].msg_hdr.msg_iovlen = niov + 1
        msgs[1].msg_hdr.msg_iov = &next_iov
        msgs[1].msg_hdr.msg_iovlen = 1
        asked = 2 if p.frames + 1 < p.limit else 1
        got_count = -1
        for attempts in range(4):
            got_count = recvmmsg(p.fd, msgs, asked, MSG_DONTWAIT, NULL)
            if got_count >= 0 or errno != EINTR:
                break
        if got_count <= 0:
            if got_count == 0 or errno == EAGAIN:
                p.status = UDP_DIRECT_DRAINED
            elif errno == EFAULT or errno == EINTR:
                p.status = UDP_DIRECT_RING_FULL  # not the socket's fault: the old way reads on
            else:
                p.status = errno
            return 0
        got = msgs[0].msg_len
        p.next_len = msgs[1].msg_len if got_count == 2 else 0
        if got <= covered and direct_commit(p, ring, &room, headers_len, got,
                                            iov_sum(iov, niov, got)):
            p.frames += 1
        else:
            # Too long for the room, or refused: the whole datagram goes back to Python (and
            # the next one with it, if it came).
            p.spilled_at = SPILL_HALF - (covered if covered < got else got)
            p.spilled_len = got
            total = p.spilled_at
            for k in range(niov):
                if total >= SPILL_HALF:
                    break
                want = iov[k].iov_len if iov[k].iov_len < SPILL_HALF - total else SPILL_HALF - total
                memcpy(p.spill + total, iov[k].iov_base, want)
                total += want
            p.status = UDP_DIRECT_SPILLED
            return 0
        if got_count == 2:
            if not direct_copy_next(p, ring, headers_len):
                p.spilled_at = SPILL_NEXT  # handed back alone
                p.spilled_len = p.next_len
                p.next_len = 0
                p.status = UDP_DIRECT_SPILLED
                return 0
            p.frames += 1
            p.next_len = 0
        if got_count < asked:
            p.status = UDP_DIRECT_DRAINED
            return 0
    return 0


cdef long udp_direct_run(void *ring, void *arg, long unused) noexcept nogil:
    """``udp_direct_work``, then what it delivered published, one interrupt for the whole call
    if the guest wants one: one guarded call (one GIL release) per receive."""
    cdef UdpDirect *p = <UdpDirect *>arg
    udp_direct_work(ring, arg, unused)
    if p.frames:
        p.api.finish(ring)
    return 0


cdef tuple direct_receive(UdpDirect *p, object ring, object capsule):
    """Run a prepared ``UdpDirect`` on ``ring`` (the ring kernel's queue, ``capsule`` its
    ``rx_direct_handle``): (status, frames, the handed-back datagrams, in order)."""
    p.api = <const RxDirectApi *>PyCapsule_GetPointer(capsule, b"vhostnet.rx_direct")
    if PyCapsule_GetContext(capsule) != <void *>ring:
        raise ValueError("the capsule belongs to another ring")
    p.frames = 0
    p.spilled_len = 0
    p.next_len = 0
    cdef long result = p.api.run(<void *>ring, udp_direct_run, <void *>p, 0)
    if result < 0:
        return UDP_DIRECT_RING_FULL, p.frames, ()  # guest memory faulted: the ring broke
    if p.status != UDP_DIRECT_SPILLED:
        return p.status, p.frames, ()
    spilled = bytes((p.spill + p.spilled_at)[:p.spilled_len])
    if p.next_len:
        return p.status, p.frames, (spilled, bytes((p.spill + SPILL_NEXT)[:p.next_len]))
    return p.status, p.frames, (spilled,)
