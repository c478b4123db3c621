# RX: FrameBatch -> guest buffers (included by virtq.pyx; functions over a RingQueue of either format).


cdef Py_ssize_t rx_push_frames(RingQueue q, FrameBatch batch, Py_ssize_t start) noexcept nogil:
    """Write frames ``start…`` of ``batch`` into RX buffers; returns how many were consumed."""
    cdef Py_ssize_t i = start
    cdef int result
    cdef int retries_left = q.size  # each retry consumes a chain; bound the work anyway
    if q._broken or not q.ready:
        return 0
    while i < batch.n and not q._broken:
        result = rx_one(q, batch.data + batch.offsets[i], batch.lengths[i], batch.vnets[i])
        if result == RX_NO_BUFFERS:
            break  # rx_one() has set kick_point
        if result == RX_RETRY:
            retries_left -= 1
            if retries_left <= 0:
                q.kick_point = q.last_avail  # come back for the rest
                break
            continue
        i += 1
    else:
        q.kick_point = q.last_avail
    q.publish_used()
    return i - start

cdef struct RxGather:
    # Chains walked (not yet completed) for one frame: chain_first_seg/nseg/capacity[0:chains].
    int chains
    uint64_t capacity       # their bytes together
    int slots               # ring slots they take
    bint bad_behind         # a bad chain lies behind them
    bint fragmented         # the segment table would not take another worst-case chain


cdef int rx_gather(RingQueue q, uint64_t needed, RxGather *g) noexcept nogil:
    """Walk available chains, without taking them, until they can hold ``needed`` bytes (one
    chain without MRG_RXBUF). A bad chain first in line is completed with length 0 at once;
    a bad chain behind good ones ends the gathering. RING_BROKEN or CHAIN_OK (``g`` says
    what was found; ``g.capacity`` may fall short of ``needed``)."""
    cdef int seg_used = 0
    cdef int nseg, reason
    cdef uint64_t total
    cdef int max_chains = q.size if q.mrg_rxbuf else 1
    g.chains = 0
    g.capacity = 0
    g.slots = 0
    g.bad_behind = False
    g.fragmented = False
    while g.capacity < needed and g.chains < max_chains:
        if g.chains and q.seg_cap - seg_used < <int>q.size + MAX_INDIRECT_ENTRIES:
            g.fragmented = True
            break
        reason = q.walk(g.chains, True, q.segs + seg_used, &nseg, &total)
        if reason == NO_CHAIN:
            break
        if reason == RING_BROKEN:
            return RING_BROKEN
        if reason != CHAIN_OK:
            if g.chains == 0:
                q.count_error(reason)
                q.complete(0, 0)
                q.advance(1)
                continue
            g.bad_behind = True
            break
        q.chain_first_seg[g.chains] = seg_used
        q.chain_nseg[g.chains] = nseg
        q.chain_capacity[g.chains] = total
        seg_used += nseg
        g.capacity += total
        g.slots += q.chain_ndesc[g.chains]
        g.chains += 1
    return CHAIN_OK


cdef int rx_one(RingQueue q, const uint8_t *frame, uint32_t frame_len, uint64_t vnet) noexcept nogil:
    """Deliver one frame into available buffers, drop it, or report that buffers are missing.

    Phase 1 (``rx_gather``) walks available chains, without taking them, until they can
    hold the header plus the frame. Phase 2 writes and completes them. If the good chains
    in front of a bad one are too small they are handed back empty so the bad one comes
    first next time.
    """
    cdef uint64_t needed = q.hdr_len + <uint64_t>frame_len
    cdef RxGather g
    cdef int reason, j
    cdef uint64_t written, pos
    cdef uint8_t header[12]

    # Offload fields first: a frame the guest cannot take is dropped before any buffer is touched.
    reason = fill_rx_header(header, vnet, frame, frame_len, q.features)
    if reason != CHAIN_OK:
        q.count_error(reason)
        return RX_DROPPED
    if rx_gather(q, needed, &g) == RING_BROKEN:
        return RX_NO_BUFFERS

    if g.capacity < needed:
        if g.bad_behind:
            # Hand the good chains back empty so the bad one is first in line next time.
            for j in range(g.chains):
                q.complete(j, 0)
            q.advance(g.chains)
            return RX_RETRY
        if g.chains == 0:
            q.kick_point = q.peek
            return RX_NO_BUFFERS
        if not q.mrg_rxbuf:
            # The chain stays in the ring for a smaller frame; this frame cannot fit one.
            q.count_error(R_RX_BUFFER_TOO_SMALL)
            return RX_DROPPED
        if g.fragmented:
            q.count_error(R_RX_TOO_FRAGMENTED)
            return RX_DROPPED
        if g.slots >= <int>q.size:
            # Every buffer of a full ring together is still too small: it can never fit.
            q.count_error(R_RX_BUFFER_TOO_SMALL)
            return RX_DROPPED
        q.kick_point = q.peek
        return RX_NO_BUFFERS

    header[10] = g.chains & 0xFF
    header[11] = g.chains >> 8
    pos = 0
    for j in range(g.chains):
        written = q.chain_capacity[j]
        if written > needed - pos:
            written = needed - pos
        scatter(q, q.segs + q.chain_first_seg[j], q.chain_nseg[j],
                     header, frame, pos, written)
        q.complete(j, <uint32_t>written)
        pos += written
    q.advance(g.chains)
    q.stats[S_RX_FRAMES] += 1
    q.stats[S_RX_BYTES] += frame_len
    q.stats[S_RX_BUFFERS] += g.chains
    if header[HDR_GSO_TYPE]:
        q.stats[S_RX_GSO_FRAMES] += 1
    return RX_DELIVERED

cdef void scatter(RingQueue q, Segment *segs, int nseg, const uint8_t *header, const uint8_t *frame,
                  uint64_t pos, uint64_t count) noexcept nogil:
    """Write bytes [pos, pos+count) of the stream header ++ frame into the chain ``segs``."""
    cdef int i
    cdef uint64_t seg_off, room, piece
    cdef const uint8_t *src
    for i in range(nseg):
        seg_off = 0
        while seg_off < segs[i].length and count:
            room = segs[i].length - seg_off
            if pos < q.hdr_len:
                src = header + pos
                piece = q.hdr_len - pos
            else:
                src = frame + (pos - q.hdr_len)
                piece = count
            if piece > room:
                piece = room
            if piece > count:
                piece = count
            q.copy_to_guest(segs[i].gpa + seg_off, src, piece)
            seg_off += piece
            pos += piece
            count -= piece
        if not count:
            return
