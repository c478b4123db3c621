# RX straight into guest buffers (included by virtq.pyx): the ring side of ext/rx_direct.pxd.
# Another kernel (tcp_fast.pyx) fills the payload itself; this file hands out the buffers as
# host memory, writes the headers, logs dirty pages and completes the chains, reusing
# rx_gather (virtq_rx.pxi) so buffers are validated exactly as for rx_push.

from cpython.pycapsule cimport PyCapsule_New, PyCapsule_SetContext
from rx_direct cimport RXD_MAX_SPANS, RxDirectApi, RxRoom, rxd_work_fn


cdef int rxd_take(void *ring, uint64_t wanted, uint64_t least, RxRoom *room) noexcept nogil:
    return direct_take(<RingQueue>ring, wanted, least, room)


cdef int direct_take(RingQueue q, uint64_t wanted, uint64_t least, RxRoom *room) noexcept nogil:
    cdef RxGather g
    cdef int j, s
    cdef Segment *seg
    cdef uint64_t gpa, left, contiguous, piece
    cdef uint8_t *host
    room.capacity = 0
    room.nspans = 0
    room.nchains = 0
    room.next_chain = 0
    room.hdr_len = q.hdr_len
    if q._broken or not q.ready:
        return 0
    if rx_gather(q, wanted, &g) == RING_BROKEN or g.chains == 0:
        q.kick_point = q.peek  # out of buffers: a kick when new ones come
        return 0
    # The spans, chain by chain, as far as the span table goes.
    for j in range(g.chains):
        if room.nspans == RXD_MAX_SPANS:
            break
        room.chain_bytes[j] = 0
        room.nchains = j + 1
        for s in range(q.chain_nseg[j]):
            seg = q.segs + q.chain_first_seg[j] + s
            gpa = seg.gpa
            left = seg.length
            while left:
                host = q.gpa_to_host(gpa, &contiguous)
                if host == NULL or room.nspans == RXD_MAX_SPANS:
                    return room.capacity >= least
                piece = contiguous if contiguous < left else left
                room.spans[room.nspans].host = host
                room.spans[room.nspans].length = piece
                room.nspans += 1
                room.capacity += piece
                room.chain_bytes[j] += piece
                gpa += piece
                left -= piece
    return room.capacity >= least


cdef void place(RingQueue q, Segment *segs, int nseg, const uint8_t *head, uint64_t head_len,
                uint64_t pos, uint64_t count) noexcept nogil:
    """Bytes [pos, pos+count) of a frame in chain ``segs``: the first ``head_len`` copied from
    ``head``, the rest already there (only logged dirty)."""
    cdef int i
    cdef uint64_t seg_off, piece
    for i in range(nseg):
        seg_off = 0
        while seg_off < segs[i].length and count:
            piece = segs[i].length - seg_off
            if piece > count:
                piece = count
            if pos < head_len:
                if piece > head_len - pos:
                    piece = head_len - pos
                q.copy_to_guest(segs[i].gpa + seg_off, head + pos, piece)
            else:
                q.log_write(segs[i].gpa + seg_off, piece)
            seg_off += piece
            pos += piece
            count -= piece
        if not count:
            return


cdef int rxd_commit(void *ring, RxRoom *room, const uint8_t *headers, uint32_t headers_len,
                    uint64_t vnet, uint64_t frame_len) noexcept nogil:
    return direct_commit(<RingQueue>ring, room, headers, headers_len, vnet, frame_len)


cdef int direct_commit(RingQueue q, RxRoom *room, const uint8_t *headers, uint32_t headers_len,
                       uint64_t vnet, uint64_t frame_len) noexcept nogil:
    cdef uint8_t head[12 + 128]
    cdef uint64_t needed = q.hdr_len + frame_len
    cdef uint64_t pos = 0, written, listed = 0
    cdef int reason, j, chains = 0
    cdef int first = room.next_chain
    for j in range(first, room.nchains):
        listed += room.chain_bytes[j]
    if headers_len > 128 or headers_len > frame_len or needed > listed:
        return R_RX_BUFFER_TOO_SMALL
    reason = fill_rx_header(head, vnet, headers, headers_len, q.features)
    if reason != CHAIN_OK:
        q.count_error(reason)
        return reason
    while pos < needed:   # the chains the frame takes (the listed bytes say they exist)
        pos += q.chain_capacity[first + chains]
        chains += 1
    head[10] = chains & 0xFF
    head[11] = chains >> 8
    memcpy(head + q.hdr_len, headers, headers_len)
    pos = 0
    for j in range(first, first + chains):
        written = q.chain_capacity[j]
        if written > needed - pos:
            written = needed - pos
        place(q, q.segs + q.chain_first_seg[j], q.chain_nseg[j], head, q.hdr_len + headers_len,
              pos, written)
        q.complete(j, <uint32_t>written)
        pos += written
    q.advance(chains, first)
    room.next_chain = first + chains
    q.kick_point = q.last_avail
    q.stats[S_RX_FRAMES] += 1
    q.stats[S_RX_BYTES] += frame_len
    q.stats[S_RX_BUFFERS] += chains
    if head[HDR_GSO_TYPE]:
        q.stats[S_RX_GSO_FRAMES] += 1
    return 0


cdef bint rxd_finish(void *ring) noexcept nogil:
    return direct_finish(<RingQueue>ring)


cdef bint direct_finish(RingQueue q) noexcept nogil:
    if q._broken or not q.ready:
        return False
    q.publish_used()
    return q._notify()


cdef long rxd_run(void *ring, rxd_work_fn work, void *arg, long n) noexcept:
    cdef RingQueue q = <RingQueue>ring  # the GIL is held here
    cdef long result
    cdef int faulted = 0
    with nogil:
        result = vq_guarded_call(<vq_guarded_fn>work, ring, arg, n, &faulted)
    if faulted:
        q.memory_fault()
        return -1
    return result


cdef RxDirectApi RX_DIRECT_API
RX_DIRECT_API.take = rxd_take
RX_DIRECT_API.commit = rxd_commit
RX_DIRECT_API.finish = rxd_finish
RX_DIRECT_API.run = rxd_run


def rx_direct_handle(RingQueue queue not None):
    """The capsule of ``RxDirectApi`` (ext/rx_direct.pxd) for ``queue`` (its context): for a
    kernel that writes frames straight into this RX ring. Keep the queue alive while using it."""
    capsule = PyCapsule_New(<void *>&RX_DIRECT_API, b"vhostnet.rx_direct", NULL)
    PyCapsule_SetContext(capsule, <void *>queue)
    return capsule
