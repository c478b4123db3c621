# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The split-virtqueue kernel: moves virtio-net frames between guest rings and a FrameBatch.

Virtio 1.x split rings, little-endian, laid out by the guest driver:

    descriptor table  16 * size bytes   {u64 addr, u32 len, u16 flags, u16 next}
    avail ring        6 + 2 * size      {u16 flags, u16 idx, u16 ring[size], u16 used_event}
    used ring         6 + 8 * size      {u16 flags, u16 idx, {u32 id, u32 len}[size], u16 avail_event}

Everything the guest wrote is hostile until checked. Each descriptor is copied
into a local struct once and validated there (so the guest cannot change it
between the check and the use), chains are walked with a step bound, buffers
are checked to lie inside mapped regions before a byte is copied, and a bad
chain is completed with length 0 and counted by reason. Per-frame work runs
without the GIL and without Python objects or allocation.

The Python face is vhostnet/virtqueue/virtqueue.py; use that, not this module.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset
from posix.unistd cimport write as c_write

import numpy as np

cdef extern from "virtq_atomic.h" nogil:
    void vq_fence_acquire()
    void vq_fence_release()
    void vq_fence_full()
    uint16_t vq_load_u16(const uint8_t *p)
    void vq_store_u16(uint8_t *p, uint16_t value)
    void vq_store_u32(uint8_t *p, uint32_t value)
    void vq_log_or(uint8_t *p, uint8_t bits)


cdef extern from "virtq_guard.h" nogil:
    ctypedef long (*vq_guarded_fn)(void *queue, void *arg, long n) noexcept nogil
    long vq_guarded_call(vq_guarded_fn fn, void *queue, void *arg, long n, int *faulted)
    int vq_guard_install()

# Every kernel entry point that touches guest memory runs under the SIGBUS guard
# (see virtq_guard.h): a front-end that shrinks its memory file breaks the queue,
# not the process.
if vq_guard_install() != 0:
    raise OSError("cannot install the SIGBUS handler that guards guest-memory copies")


include "virtq_defs.pxi"
include "virtq_offload.pxi"
include "frame_batch.pxi"


cdef class SplitQueue:
    """One split virtqueue over a table of mapped regions. Not thread-safe: one caller at a time."""

    cdef readonly uint16_t size
    cdef uint32_t hdr_len
    cdef readonly bint mrg_rxbuf
    cdef readonly bint event_idx
    cdef public int call_fd
    cdef uint16_t last_avail
    cdef uint16_t used_shadow       # next used slot to fill
    cdef uint16_t used_published    # value last stored in used->idx
    cdef uint16_t signalled_used    # used->idx at the last notify() decision
    # Where the next kick should come from: last_avail normally; while RX is starved
    # (buffers there, but too few for the next frame) the avail idx we saw, so that
    # enable_kick() waits for *new* buffers instead of reporting the old ones forever.
    cdef uint16_t kick_point
    cdef bint _broken
    cdef bint ready
    cdef uint8_t *desc
    cdef uint8_t *avail
    cdef uint8_t *used
    cdef Region *regions
    cdef int nregions
    cdef object region_refs         # keeps the mmaps behind `regions` alive
    cdef Segment *segs
    cdef int seg_cap
    cdef uint16_t *chain_head
    cdef int *chain_first_seg
    cdef int *chain_nseg
    cdef uint64_t *chain_capacity
    cdef uint64_t counts[N_REASONS]
    cdef uint64_t stats[N_STATS]
    cdef bint reported[N_REASONS]
    cdef readonly bint has_new_errors
    cdef uint8_t *log
    cdef uint64_t log_len
    cdef object log_ref
    cdef uint64_t log_guest_addr
    cdef bint log_used
    cdef uint64_t features         # negotiated virtio feature bits: which header offloads are allowed

    def __cinit__(self, int size, int hdr_len, bint mrg_rxbuf, bint event_idx, int call_fd, int base):
        if size < 1 or size > MAX_QUEUE_SIZE or (size & (size - 1)) != 0:
            raise ValueError(f"queue size {size} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        if hdr_len not in (10, 12) or (mrg_rxbuf and hdr_len != 12):
            raise ValueError(f"virtio-net header length {hdr_len} is not 10 or 12 (12 with MRG_RXBUF)")
        if not 0 <= base <= 0xFFFF:
            raise ValueError(f"base index {base} is not a 16-bit value")
        self.size = size
        self.hdr_len = hdr_len
        self.mrg_rxbuf = mrg_rxbuf
        self.event_idx = event_idx
        self.call_fd = call_fd
        self.last_avail = base
        # Room for two worst-case chains: one chain always fits, and RX only walks
        # another while a whole worst-case chain still fits.
        self.seg_cap = 2 * (size + MAX_INDIRECT_ENTRIES)
        self.segs = <Segment *>malloc(self.seg_cap * sizeof(Segment))
        self.chain_head = <uint16_t *>malloc(size * sizeof(uint16_t))
        self.chain_first_seg = <int *>malloc(size * sizeof(int))
        self.chain_nseg = <int *>malloc(size * sizeof(int))
        self.chain_capacity = <uint64_t *>malloc(size * sizeof(uint64_t))
        if (self.segs == NULL or self.chain_head == NULL or self.chain_first_seg == NULL
                or self.chain_nseg == NULL or self.chain_capacity == NULL):
            raise MemoryError()
        memset(self.counts, 0, sizeof(self.counts))
        memset(self.stats, 0, sizeof(self.stats))
        memset(self.reported, 0, sizeof(self.reported))
        self.region_refs = ()

    def __dealloc__(self):
        free(self.segs)
        free(self.chain_head)
        free(self.chain_first_seg)
        free(self.chain_nseg)
        free(self.chain_capacity)
        free(self.regions)

    # ----------------------------------------------------------------- setup

    def set_memory(self, regions, uint64_t desc_uva, uint64_t avail_uva, uint64_t used_uva) -> None:
        """Install a region table: a sequence of (gpa, uva, size, uint8 ndarray of size bytes).

        Raises LookupError if a ring is not inside one region, ValueError if misaligned.
        On the first call the used index is read from the used ring (where the guest
        and any earlier back-end left it).
        """
        cdef Py_ssize_t count = len(regions)
        cdef Region *table = <Region *>malloc((count if count else 1) * sizeof(Region))
        cdef uint8_t[::1] view
        cdef Py_ssize_t i
        cdef int faulted = 0
        if table == NULL:
            raise MemoryError()
        refs = []
        try:
            for i, (gpa, uva, size, array) in enumerate(regions):
                view = array
                if view.shape[0] != size or size == 0:
                    raise ValueError("region array length does not match its size")
                table[i].gpa = gpa
                table[i].uva = uva
                table[i].size = size
                table[i].host = &view[0]
                refs.append(array)
        except BaseException:
            free(table)
            raise
        free(self.regions)
        self.regions = table
        self.nregions = <int>count
        self.region_refs = refs
        self.ready = False
        desc = self.uva_to_host(desc_uva, DESC_SIZE * <uint64_t>self.size)
        avail = self.uva_to_host(avail_uva, 6 + 2 * <uint64_t>self.size)
        used = self.uva_to_host(used_uva, 6 + 8 * <uint64_t>self.size)
        if desc == NULL or avail == NULL or used == NULL:
            raise LookupError("a ring address is not inside one mapped region")
        if (<uintptr_t>desc) % 16 or (<uintptr_t>avail) % 2 or (<uintptr_t>used) % 4:
            raise ValueError("ring addresses are not aligned as virtio requires (16/2/4)")
        first_time = self.desc == NULL
        self.desc = desc
        self.avail = avail
        self.used = used
        if first_time:
            self.kick_point = self.last_avail
            with nogil:
                self.used_published = <uint16_t>vq_guarded_call(guarded_used_idx, <void *>self, NULL, 0, &faulted)
            if faulted:
                self.memory_fault()
                raise LookupError("the used ring is not backed by the front-end's memory file any more")
            self.used_shadow = self.used_published
            self.signalled_used = self.used_published
        self.ready = True

    cdef uint8_t *uva_to_host(self, uint64_t uva, uint64_t length):
        cdef int i
        for i in range(self.nregions):
            if (uva >= self.regions[i].uva and uva - self.regions[i].uva <= self.regions[i].size
                    and length <= self.regions[i].size - (uva - self.regions[i].uva)):
                return self.regions[i].host + (uva - self.regions[i].uva)
        return NULL

    def set_log(self, log_array, uint64_t log_guest_addr, bint log_used) -> None:
        """Start (uint8 array) or stop (None) dirty-page logging. ``log_used``: the ring's LOG flag."""
        cdef uint8_t[::1] view
        if log_array is None:
            self.log = NULL
            self.log_len = 0
            self.log_ref = None
            return
        view = log_array
        self.log_ref = log_array
        self.log_len = view.shape[0]
        self.log = &view[0] if self.log_len else NULL
        self.log_guest_addr = log_guest_addr
        self.log_used = log_used

    def mark_broken(self) -> None:
        self._broken = True

    cdef void memory_fault(self):
        """A guest-memory access raised SIGBUS (the file shrank): this queue is done."""
        self._broken = True
        self.count_error(R_GUEST_MEMORY_FAULT)

    @property
    def faulted(self) -> bool:
        """True once guest memory vanished under a copy: the connection must close."""
        return self.counts[R_GUEST_MEMORY_FAULT] != 0

    def set_features(self, uint64_t features) -> None:
        """The negotiated feature bits: which virtio-net header offloads each direction may use."""
        self.features = features

    # ------------------------------------------------------------ properties

    @property
    def broken(self) -> bool:
        return self._broken

    @property
    def last_avail_idx(self) -> int:
        return self.last_avail

    @property
    def used_idx(self) -> int:
        return self.used_published

    def positions(self) -> dict:
        """Where the ring stands, ours and the guest's (for stats: a stalled ring shows here)."""
        result = {"last_avail": self.last_avail, "used": self.used_published,
                  "kick_point": self.kick_point}
        cdef uint16_t seen[5]
        cdef int faulted = 0
        if self.ready and not self._broken:
            with nogil:
                vq_guarded_call(guarded_positions, <void *>self, <void *>seen, 0, &faulted)
            if faulted:
                self.memory_fault()
                return result
            result["guest_avail"] = seen[0]
            result["guest_avail_flags"] = seen[1]
            result["guest_used_event"] = seen[2]
            result["used_flags"] = seen[3]
            result["avail_event"] = seen[4]
        return result

    def counters(self) -> dict:
        result = {name: self.stats[i] for i, name in enumerate(STAT_NAMES)}
        result.update({name: self.counts[i] for i, name in enumerate(REASON_NAMES)})
        return result

    def take_new_errors(self) -> list:
        """Names of error reasons seen for the first time since the last call."""
        fresh = []
        for i, name in enumerate(REASON_NAMES):
            if self.counts[i] and not self.reported[i]:
                self.reported[i] = True
                fresh.append(name)
        self.has_new_errors = False
        return fresh

    # --------------------------------------------------------- public kernel

    def tx_drain(self, FrameBatch batch not None, int max_frames) -> int:
        return self.guarded(guarded_tx_drain, <void *>batch, max_frames)

    def rx_push(self, FrameBatch batch not None, Py_ssize_t start=0) -> int:
        if start < 0 or start > batch.n:
            raise IndexError(f"start {start} outside the batch of {batch.n} frames")
        return self.guarded(guarded_rx_push, <void *>batch, start)

    def notify(self) -> bool:
        return bool(self.guarded(guarded_notify, NULL, 0))

    def signal_restart(self) -> bool:
        """Interrupt the guest once, unconditionally: the ring (re)started here.

        An interrupt the previous back-end raised just before the guest was
        stopped (migration, reconnect) can be lost with the old QEMU; the guest
        then waits for one while its event index already lies behind ``used``,
        so no later notification would ever be "needed" (Linux vhost's first
        signal after a start is unconditional for the same reason). A spurious
        interrupt costs the guest one look at the ring.
        """
        if self._broken or not self.ready:
            return False
        self.signalled_used = self.used_published
        return bool(self.guarded(guarded_signal, NULL, 0))

    def enable_kick(self) -> bool:
        return bool(self.guarded(guarded_enable_kick, NULL, 0))

    def disable_kick(self) -> None:
        self.guarded(guarded_disable_kick, NULL, 0)

    cdef void read_positions(self, uint16_t *seen) noexcept nogil:
        """The guest's avail idx, flags, used_event; our used flags and avail_event."""
        seen[0] = vq_load_u16(self.avail + 2)
        seen[1] = vq_load_u16(self.avail)
        seen[2] = vq_load_u16(self.avail + 4 + 2 * <uint64_t>self.size)
        seen[3] = vq_load_u16(self.used)
        seen[4] = vq_load_u16(self.used + 4 + 8 * <uint64_t>self.size)

    cdef long guarded(self, vq_guarded_fn fn, void *arg, long n):
        """``fn(self, arg, n)`` without the GIL, under the SIGBUS guard; 0 if guest memory faulted."""
        cdef long result
        cdef int faulted = 0
        with nogil:
            result = vq_guarded_call(fn, <void *>self, arg, n, &faulted)
        if faulted:
            self.memory_fault()
        return result

    # ------------------------------------------------------- memory helpers

    cdef inline void count_error(self, int reason) noexcept nogil:
        if self.counts[reason] == 0:
            self.has_new_errors = True
        self.counts[reason] += 1

    cdef inline uint8_t *gpa_to_host(self, uint64_t gpa, uint64_t *contiguous) noexcept nogil:
        """Host pointer for ``gpa`` and how many bytes follow it in the same region."""
        cdef int i
        for i in range(self.nregions):
            if gpa >= self.regions[i].gpa and gpa - self.regions[i].gpa < self.regions[i].size:
                contiguous[0] = self.regions[i].size - (gpa - self.regions[i].gpa)
                return self.regions[i].host + (gpa - self.regions[i].gpa)
        return NULL

    cdef int check_range(self, uint64_t gpa, uint64_t length) noexcept nogil:
        """CHAIN_OK if [gpa, gpa+length) is mapped, possibly across adjacent regions."""
        cdef uint64_t contiguous, piece
        if length == 0:
            return CHAIN_OK
        if length - 1 > <uint64_t>0xFFFFFFFFFFFFFFFF - gpa:
            return R_ADDRESS_OVERFLOW
        while length:
            if self.gpa_to_host(gpa, &contiguous) == NULL:
                return R_ADDRESS_UNMAPPED
            piece = contiguous if contiguous < length else length
            gpa += piece
            length -= piece
        return CHAIN_OK

    cdef bint copy_from_guest(self, uint8_t *dst, uint64_t gpa, uint64_t length) noexcept nogil:
        cdef uint64_t contiguous, piece
        cdef uint8_t *src
        while length:
            src = self.gpa_to_host(gpa, &contiguous)
            if src == NULL:
                return False
            piece = contiguous if contiguous < length else length
            memcpy(dst, src, piece)
            dst += piece
            gpa += piece
            length -= piece
        return True

    cdef bint copy_to_guest(self, uint64_t gpa, const uint8_t *src, uint64_t length) noexcept nogil:
        cdef uint64_t contiguous, piece
        cdef uint8_t *dst
        while length:
            dst = self.gpa_to_host(gpa, &contiguous)
            if dst == NULL:
                return False
            piece = contiguous if contiguous < length else length
            memcpy(dst, src, piece)
            self.log_write(gpa, piece)
            src += piece
            gpa += piece
            length -= piece
        return True

    cdef void log_write(self, uint64_t gpa, uint64_t length) noexcept nogil:
        """Mark the 4 KiB pages of a guest write dirty (migration); pages past the log are ignored."""
        cdef uint64_t page, last
        if self.log == NULL or length == 0 or length - 1 > <uint64_t>0xFFFFFFFFFFFFFFFF - gpa:
            return
        page = gpa >> LOG_PAGE_SHIFT
        last = (gpa + length - 1) >> LOG_PAGE_SHIFT
        while page <= last and (page >> 3) < self.log_len:
            vq_log_or(self.log + (page >> 3), <uint8_t>(1 << (page & 7)))
            page += 1

    cdef inline void log_used_ring(self, uint64_t offset, uint64_t length) noexcept nogil:
        if self.log_used:
            self.log_write(self.log_guest_addr + offset, length)

    # --------------------------------------------------------- ring helpers

    cdef int pending(self) noexcept nogil:
        """Chains the guest has made available and we have not taken; -1 if the ring is insane."""
        cdef uint16_t avail_idx = vq_load_u16(self.avail + 2)
        vq_fence_acquire()
        cdef uint16_t waiting = avail_idx - self.last_avail
        if waiting > self.size:
            # The guest claims more new buffers than the ring holds: nothing in it can be trusted.
            self._broken = True
            self.count_error(R_AVAIL_IDX_JUMP)
            return -1
        return waiting

    cdef inline uint16_t avail_head(self, uint16_t position) noexcept nogil:
        return vq_load_u16(self.avail + 4 + 2 * (position & (self.size - 1)))

    cdef inline void put_used(self, uint16_t head, uint32_t length) noexcept nogil:
        cdef uint64_t offset = 4 + 8 * <uint64_t>(self.used_shadow & (self.size - 1))
        vq_store_u32(self.used + offset, head)
        vq_store_u32(self.used + offset + 4, length)
        self.log_used_ring(offset, 8)
        self.used_shadow += 1

    cdef void publish_used(self) noexcept nogil:
        if self.used_shadow == self.used_published:
            return
        vq_fence_release()  # entries must be visible before the index that exposes them
        vq_store_u16(self.used + 2, self.used_shadow)
        self.log_used_ring(2, 2)
        self.used_published = self.used_shadow

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

        Returns CHAIN_OK or a reason. ``out`` must have room for size + MAX_INDIRECT_ENTRIES
        segments: the direct part is at most ``size`` steps and an indirect table at most
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
                if in_indirect:
                    return R_INDIRECT_NESTED
                if d.flags & DESC_F_NEXT:
                    return R_INDIRECT_WITH_NEXT
                if d.length == 0 or d.length % DESC_SIZE or d.length // DESC_SIZE > MAX_INDIRECT_ENTRIES:
                    return R_INDIRECT_BAD_LENGTH
                reason = self.check_range(d.addr, d.length)
                if reason != CHAIN_OK:
                    return reason
                in_indirect = True
                table_gpa = d.addr
                table_len = d.length // DESC_SIZE
                index = 0
                steps = 0
                continue
            if d.length:
                if ((d.flags & DESC_F_WRITE) != 0) != want_writable:
                    return R_WRONG_DIRECTION
                reason = self.check_range(d.addr, d.length)
                if reason != CHAIN_OK:
                    return reason
                out[n].gpa = d.addr
                out[n].length = d.length
                n += 1
                total += d.length
            if not (d.flags & DESC_F_NEXT):
                break
            index = d.next
            if index >= table_len:
                return R_NEXT_OUT_OF_RANGE
        nseg_out[0] = n
        total_out[0] = total
        return CHAIN_OK

    # ------------------------------------------------------- notifications

    cdef bint _notify(self) noexcept nogil:
        cdef uint16_t new_idx = self.used_published
        cdef uint16_t old_idx = self.signalled_used
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

    cdef bint _signal(self) noexcept nogil:
        """Write the call eventfd (if there is one) and count the interrupt."""
        cdef uint64_t one = 1
        if self.call_fd < 0:
            return False
        if c_write(self.call_fd, &one, 8) != 8:
            self.count_error(R_NOTIFY_FAILED)
            return False
        self.stats[S_NOTIFICATIONS] += 1
        return True

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


# The two halves of the per-frame work, as functions over a SplitQueue (a class body cannot include files).
include "virtq_tx.pxi"
include "virtq_rx.pxi"


# Kernel entry points in the shape vq_guarded_call takes: (queue, argument, number).
cdef long guarded_tx_drain(void *queue, void *batch, long max_frames) noexcept nogil:
    return tx_drain_frames(<SplitQueue>queue, <FrameBatch>batch, <int>max_frames)


cdef long guarded_rx_push(void *queue, void *batch, long start) noexcept nogil:
    return rx_push_frames(<SplitQueue>queue, <FrameBatch>batch, start)


cdef long guarded_notify(void *queue, void *unused, long n) noexcept nogil:
    return (<SplitQueue>queue)._notify()


cdef long guarded_signal(void *queue, void *unused, long n) noexcept nogil:
    return (<SplitQueue>queue)._signal()


cdef long guarded_enable_kick(void *queue, void *unused, long n) noexcept nogil:
    return (<SplitQueue>queue)._enable_kick()


cdef long guarded_disable_kick(void *queue, void *unused, long n) noexcept nogil:
    (<SplitQueue>queue)._disable_kick()
    return 0


cdef long guarded_used_idx(void *queue, void *unused, long n) noexcept nogil:
    return vq_load_u16((<SplitQueue>queue).used + 2)


cdef long guarded_positions(void *queue, void *out, long n) noexcept nogil:
    (<SplitQueue>queue).read_positions(<uint16_t *>out)
    return 0
