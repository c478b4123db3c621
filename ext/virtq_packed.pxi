# Packed rings (virtio 1.1+, VIRTIO_F_RING_PACKED; included by virtq.pyx): the RingQueue format part.
#
#   descriptor ring   16 * size bytes   {u64 addr, u32 len, u16 id, u16 flags}
#   driver area       4 bytes           {u16 off_wrap, u16 flags}: when the guest wants interrupts
#   device area       4 bytes           {u16 off_wrap, u16 flags}: when we want kicks
#
# The guest makes a descriptor available by setting its AVAIL bit to its wrap counter
# and its USED bit to the opposite; a chain is consecutive descriptors linked by NEXT,
# its buffer id in the last one, the head's flags written last. We hand a chain back
# with one descriptor written where the chain started (id, bytes written, AVAIL and
# USED both equal to our used wrap counter) and skip the chain's slots. Positions
# are ``slot | wrap counter << 15``, as in the vhost-user base.

cdef enum:
    PACKED_DESC_F_AVAIL = 1 << 7
    PACKED_DESC_F_USED = 1 << 15
    PACKED_WRAP = 1 << 15
    EVENT_FLAG_ENABLE = 0
    EVENT_FLAG_DISABLE = 1
    EVENT_FLAG_DESC = 2
    PACKED_DESC_ID = 12
    PACKED_DESC_FLAGS = 14


cdef struct PackedDesc:
    uint64_t addr
    uint32_t length
    uint16_t id
    uint16_t flags


cdef inline uint16_t packed_step(uint16_t position, uint32_t count, uint16_t size) noexcept nogil:
    """``position`` moved ``count`` (<= size) slots on, flipping the wrap counter past the end."""
    cdef uint32_t slot = (position & 0x7FFF) + count
    cdef uint16_t wrap = position & PACKED_WRAP
    if slot >= size:
        slot -= size
        wrap ^= PACKED_WRAP
    return <uint16_t>slot | wrap


cdef inline bint packed_available(uint16_t flags, uint16_t position) noexcept nogil:
    """Did the guest make the descriptor at ``position`` available in this lap of the ring?"""
    cdef bint wrap = (position & PACKED_WRAP) != 0
    return ((flags & PACKED_DESC_F_AVAIL) != 0) == wrap and ((flags & PACKED_DESC_F_USED) != 0) != wrap


cdef class PackedQueue(RingQueue):
    """One packed virtqueue. ``base``: next avail position in the low 16 bits, the used
    position in the high 16 (each ``slot | wrap << 15``; a fresh ring is 0x80008000)."""

    cdef uint64_t desc_gpa          # for the dirty log: our used descriptors land in this ring

    def __cinit__(self, int size, int hdr_len, bint mrg_rxbuf, bint event_idx, int call_fd,
                  long long base):
        cdef uint16_t avail = base & 0xFFFF
        cdef uint16_t used = (base >> 16) & 0xFFFF
        if (avail & 0x7FFF) >= size or (used & 0x7FFF) >= size:
            raise ValueError(f"packed ring base {base:#x} names a slot outside the ring of {size}")
        self.last_avail = avail
        self.used_shadow = self.used_published = used

    cdef uint64_t driver_area_bytes(self):
        return 4

    cdef uint64_t device_area_bytes(self):
        return 4

    cdef rings_installed(self, uint64_t desc_uva):
        self.desc_gpa = self.uva_to_gpa(desc_uva)

    @property
    def base(self) -> int:
        return self.last_avail | (<uint32_t>self.used_published << 16)

    cdef tuple position_names(self):
        return ("next_desc_flags", "driver_event_off_wrap", "driver_event_flags",
                "device_event_off_wrap", "device_event_flags")

    cdef void read_positions(self, uint16_t *seen) noexcept nogil:
        seen[0] = self.flags_at(self.last_avail)
        seen[1] = vq_load_u16(self.avail)
        seen[2] = vq_load_u16(self.avail + 2)
        seen[3] = vq_load_u16(self.used)
        seen[4] = vq_load_u16(self.used + 2)

    cdef inline uint16_t flags_at(self, uint16_t position) noexcept nogil:
        return vq_load_u16(self.desc + DESC_SIZE * <uint64_t>(position & 0x7FFF) + PACKED_DESC_FLAGS)

    # --------------------------------------------------------- ring helpers

    cdef int walk(self, int k, bint want_writable, Segment *out, int *nseg,
                  uint64_t *total) noexcept nogil:
        cdef PackedDesc d
        cdef uint16_t position
        cdef uint32_t ndesc = 0
        cdef int reason = CHAIN_OK
        cdef int n = 0
        cdef uint64_t sum = 0
        if k == 0:
            self.peek = self.last_avail
        position = self.peek
        while True:
            if not packed_available(self.flags_at(position), position):
                if ndesc == 0:
                    return NO_CHAIN
                # The guest makes a chain's head available last: a chain running into a
                # descriptor that is not available means its flags cannot be trusted.
                self.break_ring(R_PACKED_CHAIN_NOT_AVAILABLE)
                return RING_BROKEN
            if ndesc >= self.size:
                self.break_ring(R_CHAIN_LOOP)
                return RING_BROKEN
            vq_fence_acquire()  # the flags said available: only now read the rest
            memcpy(&d, self.desc + DESC_SIZE * <uint64_t>(position & 0x7FFF), DESC_SIZE)
            ndesc += 1
            position = packed_step(position, 1, self.size)
            # A bad descriptor refuses the chain, but the walk goes on to find its end.
            if reason == CHAIN_OK:
                if d.flags & DESC_F_INDIRECT:
                    reason = self.walk_indirect(d, want_writable, out, &n, &sum)
                else:
                    reason = self.add_buffer(d.addr, d.length, d.flags, want_writable, out, &n, &sum)
            if not (d.flags & DESC_F_NEXT):
                break
        if reason == CHAIN_OK and d.id >= self.size:
            reason = R_HEAD_OUT_OF_RANGE
        self.chain_head[k] = d.id
        self.chain_ndesc[k] = <uint16_t>ndesc
        self.peek = position
        nseg[0] = n
        total[0] = sum
        return reason

    cdef int walk_indirect(self, PackedDesc table, bint want_writable, Segment *out, int *n,
                           uint64_t *total) noexcept nogil:
        """The buffers of an indirect table: packed descriptors used in order, all of them."""
        cdef PackedDesc d
        cdef uint32_t i
        cdef int reason = self.check_indirect(table.addr, table.length, table.flags, False)
        if reason != CHAIN_OK:
            return reason
        for i in range(table.length // DESC_SIZE):
            if not self.copy_from_guest(<uint8_t *>&d, table.addr + DESC_SIZE * <uint64_t>i,
                                        DESC_SIZE):
                return R_ADDRESS_UNMAPPED
            if d.flags & DESC_F_INDIRECT:
                return R_INDIRECT_NESTED
            reason = self.add_buffer(d.addr, d.length, d.flags, want_writable, out, n, total)
            if reason != CHAIN_OK:
                return reason
        return CHAIN_OK

    cdef void complete(self, int k, uint32_t length) noexcept nogil:
        cdef uint64_t offset = DESC_SIZE * <uint64_t>(self.used_shadow & 0x7FFF)
        cdef uint8_t *slot = self.desc + offset
        cdef uint16_t flags = (PACKED_DESC_F_AVAIL | PACKED_DESC_F_USED
                               if self.used_shadow & PACKED_WRAP else 0)
        vq_store_u32(slot + 8, length)
        vq_store_u16(slot + PACKED_DESC_ID, self.chain_head[k])
        vq_fence_release()  # id and length before the flags that hand the slot back
        vq_store_u16(slot + PACKED_DESC_FLAGS, flags)
        if self.log_used:
            self.log_write(self.desc_gpa + offset, DESC_SIZE)
        self.used_shadow = packed_step(self.used_shadow, self.chain_ndesc[k], self.size)
        self.unpublished += 1

    cdef void advance(self, int count, int first=0) noexcept nogil:
        cdef int k
        for k in range(first, first + count):
            self.last_avail = packed_step(self.last_avail, self.chain_ndesc[k], self.size)

    # ------------------------------------------------------- notifications

    cdef int linear(self, uint16_t position, uint16_t reference) noexcept nogil:
        """``position`` on the slot line of ``reference``'s lap (one lap back if the wrap differs)."""
        cdef int slot = position & 0x7FFF
        if (position ^ reference) & PACKED_WRAP:
            slot -= self.size
        return slot

    cdef bint _notify_from(self, uint16_t old) noexcept nogil:
        cdef uint16_t new = self.used_published
        cdef uint16_t flags, off_wrap
        cdef int new_at, old_at, event_at
        cdef bint wanted
        if self._broken or not self.ready or new == old:
            return False
        vq_fence_full()  # our used flags must be ordered before reading the guest's wishes
        off_wrap = vq_load_u16(self.avail)
        flags = vq_load_u16(self.avail + 2)
        if flags == EVENT_FLAG_DISABLE:
            wanted = False
        elif flags == EVENT_FLAG_DESC and self.event_idx:
            # Interrupt if the used position just passed the guest's event descriptor.
            new_at = new & 0x7FFF
            old_at = self.linear(old, new)
            event_at = self.linear(off_wrap, new)
            wanted = old_at <= event_at < new_at
        else:
            wanted = True
        self.signalled_used = new
        if not wanted:
            return False
        return self._signal()

    cdef bint _enable_kick(self) noexcept nogil:
        if self._broken or not self.ready:
            return False
        if self.event_idx:
            # Kick when the descriptor at kick_point becomes available.
            vq_store_u16(self.used, self.kick_point)
            vq_fence_release()
            vq_store_u16(self.used + 2, EVENT_FLAG_DESC)
        else:
            vq_store_u16(self.used + 2, EVENT_FLAG_ENABLE)
        self.log_used_ring(0, 4)
        # The guest reads our flags after making descriptors available; we read its
        # descriptor flags after writing ours. The full fence makes sure one sees the other.
        vq_fence_full()
        return packed_available(self.flags_at(self.kick_point), self.kick_point)

    cdef void _disable_kick(self) noexcept nogil:
        if self._broken or not self.ready:
            return
        vq_store_u16(self.used + 2, EVENT_FLAG_DISABLE)
        self.log_used_ring(0, 4)
