# Split rings (included by virtq.pyx): the RingQueue format part.
#
#   descriptor table  16 * size bytes   {u64 addr, u32 len, u16 flags, u16 next}
#   avail ring        6 + 2 * size      {u16 flags, u16 idx, u16 ring[size], u16 used_event}
#   used ring         6 + 8 * size      {u16 flags, u16 idx, {u32 id, u32 len}[size], u16 avail_event}


cdef class SplitQueue(RingQueue):
    """One split virtqueue. ``base`` (low 16 bits) is the next avail index."""

    cdef int waiting                # chains the guest made available beyond last_avail, as last read

    def __cinit__(self, int size, int hdr_len, bint mrg_rxbuf, bint event_idx, int call_fd,
                  long long base):
        self.last_avail = <uint16_t>(base & 0xFFFF)

    cdef uint64_t driver_area_bytes(self):
        return 6 + 2 * <uint64_t>self.size

    cdef uint64_t device_area_bytes(self):
        return 6 + 8 * <uint64_t>self.size

    cdef int driver_area_align(self):
        return 2

    cdef start_positions(self):
        cdef int faulted = 0
        with nogil:
            self.used_published = <uint16_t>vq_guarded_call(guarded_used_idx, <void *>self, NULL, 0,
                                                            &faulted)
        if faulted:
            self.memory_fault()
            raise LookupError("the used ring is not backed by the front-end's memory file any more")
        self.used_shadow = self.used_published

    cdef tuple position_names(self):
        return ("guest_avail", "guest_avail_flags", "guest_used_event", "used_flags", "avail_event")

    cdef void read_positions(self, uint16_t *seen) noexcept nogil:
        seen[0] = vq_load_u16(self.avail + 2)
        seen[1] = vq_load_u16(self.avail)
        seen[2] = vq_load_u16(self.avail + 4 + 2 * <uint64_t>self.size)
        seen[3] = vq_load_u16(self.used)
        seen[4] = vq_load_u16(self.used + 4 + 8 * <uint64_t>self.size)

    # --------------------------------------------------------- ring helpers

    cdef int pending(self) noexcept nogil:
        """Chains the guest has made available and we have not taken; -1 if the ring is insane."""
        cdef uint16_t avail_idx = vq_load_u16(self.avail + 2)
        vq_fence_acquire()
        cdef uint16_t waiting = avail_idx - self.last_avail
        if waiting > self.size:
            # The guest claims more new buffers than the ring holds: nothing in it can be trusted.
            self.break_ring(R_AVAIL_IDX_JUMP)
            return -1
        return waiting

    cdef int walk(self, int k, bint want_writable, Segment *out, int *nseg,
                  uint64_t *total) noexcept nogil:
        cdef uint16_t head
        if k >= self.waiting:
            self.waiting = self.pending()
            if self.waiting < 0:
                self.waiting = 0
                return RING_BROKEN
            if k >= self.waiting:
                self.peek = self.last_avail + k
                return NO_CHAIN
        head = vq_load_u16(self.avail + 4 + 2 * ((self.last_avail + k) & (self.size - 1)))
        self.chain_head[k] = head
        self.chain_ndesc[k] = 1     # one avail slot
        return self.walk_chain(head, want_writable, out, nseg, total)

    cdef void complete(self, int k, uint32_t length) noexcept nogil:
        cdef uint64_t offset = 4 + 8 * <uint64_t>(self.used_shadow & (self.size - 1))
        vq_store_u32(self.used + offset, self.chain_head[k])
        vq_store_u32(self.used + offset + 4, length)
        self.log_used_ring(offset, 8)
        self.used_shadow += 1
        self.unpublished += 1

    cdef void advance(self, int count, int first=0) noexcept nogil:
        self.last_avail += count
        self.waiting -= count

    cdef void publish_used(self) noexcept nogil:
        if self.used_shadow == self.used_published:
            return
        vq_fence_release()  # entries must be visible before the index that exposes them
        vq_store_u16(self.used + 2, self.used_shadow)
        self.log_used_ring(2, 2)
        self.used_published = self.used_shadow
        self.unpublished = 0

    cdef bint read_desc(self, bint indirect, uint64_t table_gpa, uint32_t index,
                        Desc *out) noexcept nogil:
        if indirect:
            return self.copy_from_guest(<uint8_t *>out, table_gpa + DESC_SIZE * <uint64_t>index,
                                        DESC_SIZE)
        memcpy(out, self.desc + DESC_SIZE * <uint64_t>index, DESC_SIZE)
        return True

    cdef int walk_chain(self, uint16_t head, bint want_writable, Segment *out,
                        int *nseg_out, uint64_t *total_out) noexcept nogil:
        """Validate the chain at ``head`` and list its non-empty buffers in ``out``.

        The direct part is at most ``size`` steps and an indirect table at most
        MAX_INDIRECT_ENTRIES entries.
        """
        cdef Desc d
        cdef uint32_t index = head
        cdef uint32_t table_len = self.size
        cdef uint64_t table_gpa = 0
        cdef bint in_indirect = False
        cdef uint32_t steps = 0
        cdef int n = 0
        cdef uint64_t total = 0
        cdef int reason
        if head >= self.size:
            return R_HEAD_OUT_OF_RANGE
        while True:
            # More steps than the table has entries can only be a loop.
            if steps >= table_len:
                return R_CHAIN_LOOP
            steps += 1
            if not self.read_desc(in_indirect, table_gpa, index, &d):
                return R_ADDRESS_UNMAPPED
            if d.flags & DESC_F_INDIRECT:
                reason = self.check_indirect(d.addr, d.length, d.flags, in_indirect)
                if reason != CHAIN_OK:
                    return reason
                in_indirect = True
                table_gpa = d.addr
                table_len = d.length // DESC_SIZE
                index = 0
                steps = 0
                continue
            reason = self.add_buffer(d.addr, d.length, d.flags, want_writable, out, &n, &total)
            if reason != CHAIN_OK:
                return reason
            if not (d.flags & DESC_F_NEXT):
                break
            index = d.next
            if index >= table_len:
                return R_NEXT_OUT_OF_RANGE
        nseg_out[0] = n
        total_out[0] = total
        return CHAIN_OK

    # ------------------------------------------------------- notifications

    cdef bint _notify_from(self, uint16_t old_idx) noexcept nogil:
        cdef uint16_t new_idx = self.used_published
        cdef uint16_t used_event
        cdef bint wanted
        if self._broken or not self.ready or new_idx == old_idx:
            return False
        vq_fence_full()  # our used->idx store must be ordered before reading the guest's wishes
        if self.event_idx:
            used_event = vq_load_u16(self.avail + 4 + 2 * <uint64_t>self.size)
            # vring_need_event: did used->idx just step past used_event?
            wanted = <uint16_t>(new_idx - used_event - 1) < <uint16_t>(new_idx - old_idx)
        else:
            wanted = (vq_load_u16(self.avail) & AVAIL_F_NO_INTERRUPT) == 0
        self.signalled_used = new_idx
        if not wanted:
            return False
        return self._signal()

    cdef bint _enable_kick(self) noexcept nogil:
        cdef uint64_t offset
        if self._broken or not self.ready:
            return False
        if self.event_idx:
            offset = 4 + 8 * <uint64_t>self.size
            vq_store_u16(self.used + offset, self.kick_point)
            self.log_used_ring(offset, 2)
        else:
            vq_store_u16(self.used, vq_load_u16(self.used) & ~USED_F_NO_NOTIFY)
            self.log_used_ring(0, 2)
        # The guest reads our flag/avail_event after writing avail->idx; we read avail->idx
        # after writing ours. The full fence makes sure one of us sees the other.
        vq_fence_full()
        return vq_load_u16(self.avail + 2) != self.kick_point

    cdef void _disable_kick(self) noexcept nogil:
        if self._broken or not self.ready or self.event_idx:
            # With EVENT_IDX the guest kicks only when avail passes avail_event, which we
            # simply stop advancing.
            return
        vq_store_u16(self.used, vq_load_u16(self.used) | USED_F_NO_NOTIFY)
        self.log_used_ring(0, 2)


cdef long guarded_used_idx(void *queue, void *unused, long n) noexcept nogil:
    return vq_load_u16((<SplitQueue>queue).used + 2)
