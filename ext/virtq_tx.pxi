# TX: guest chains -> FrameBatch (included by virtq.pyx; functions over a RingQueue of either format).


cdef int tx_drain_frames(RingQueue q, FrameBatch batch, int max_frames) noexcept nogil:
    """Pop available TX chains into ``batch`` (header stripped, offload fields kept); frames taken."""
    cdef int frames = 0
    cdef int chains_left = 2 * <int>q.size  # bounds the work one call does
    cdef int nseg, reason
    cdef uint64_t total, frame_len, vnet
    cdef uint8_t header[12]
    if q._broken or not q.ready:
        return 0
    while frames < max_frames and chains_left > 0:
        reason = q.walk(0, False, q.segs, &nseg, &total)
        if reason == NO_CHAIN or reason == RING_BROKEN:
            break
        frame_len = 0
        if reason == CHAIN_OK:
            if total < q.hdr_len + ETH_HEADER_BYTES:
                reason = R_TX_FRAME_TOO_SHORT
            elif total - q.hdr_len > MAX_FRAME_BYTES_C:
                reason = R_TX_FRAME_TOO_LONG
            else:
                frame_len = total - q.hdr_len
                if not batch.room_for(frame_len):
                    break  # leave the chain in the ring for the next call
                # The header is copied out once and checked from the copy (the guest may change it).
                if not gather(q, nseg, 0, VNET_HEADER_FIELDS, header):
                    reason = R_ADDRESS_UNMAPPED
                else:
                    reason = check_tx_header(header, frame_len, q.features, &vnet)
                if reason == CHAIN_OK:
                    if gather(q, nseg, q.hdr_len, frame_len, batch.data + batch.fill):
                        batch.commit(<uint32_t>frame_len, vnet)
                        frames += 1
                        q.stats[S_TX_FRAMES] += 1
                        q.stats[S_TX_BYTES] += frame_len
                        if vnet_gso_type(vnet) != VNET_GSO_NONE:
                            q.stats[S_TX_GSO_FRAMES] += 1
                    else:
                        reason = R_ADDRESS_UNMAPPED
        if reason != CHAIN_OK:
            q.count_error(reason)
        q.complete(0, 0)
        q.advance(1)
        chains_left -= 1
        if q.unpublished >= TX_USED_PUBLISH_EVERY:
            # The frames are copied out already: the guest may reuse these buffers now.
            q.publish_used()
            q._notify()
    q.kick_point = q.last_avail
    q.publish_used()
    return frames


cdef bint gather(RingQueue q, int nseg, uint64_t skip, uint64_t count, uint8_t *dst) noexcept nogil:
    """Copy ``count`` readable bytes of q.segs[:nseg], starting ``skip`` bytes in."""
    cdef int i
    cdef uint64_t length, piece
    for i in range(nseg):
        if count == 0:
            break
        length = q.segs[i].length
        if skip >= length:
            skip -= length
            continue
        piece = length - skip
        if piece > count:
            piece = count
        if not q.copy_from_guest(dst, q.segs[i].gpa + skip, piece):
            return False
        dst += piece
        count -= piece
        skip = 0
    return count == 0
