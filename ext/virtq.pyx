# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The virtqueue kernel: moves virtio-net frames between guest rings and a FrameBatch.

Both virtio 1.x ring formats, little-endian, laid out by the guest driver: split
rings (SplitQueue, virtq_split.pxi) and packed rings (PackedQueue, virtq_packed.pxi).
They share everything but the ring itself (RingQueue, below): the region table and
the checked copies in and out of guest memory, the validation of each buffer and
indirect table, the per-frame TX and RX work (virtq_tx.pxi, virtq_rx.pxi), offloads,
dirty logging, counters and the SIGBUS guard. A format supplies how chains are found
(``walk``), completed (``complete``, ``advance``, ``publish_used``) and how the two
sides tell each other about new work (``_notify``, ``_enable_kick``, ``_disable_kick``).

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

from frame_batch cimport FrameArrays, frame_at

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
include "virtq_steer.pxi"
include "virtq_segment.pxi"
include "virtq_switch.pxi"

# walk() results besides CHAIN_OK and a refusal reason.
cdef enum:
    NO_CHAIN = -2       # nothing (more) available
    RING_BROKEN = -3    # the ring cannot be trusted any more (queue marked broken, counted)


cdef class RingQueue:
    """What both ring formats share. Not thread-safe: one caller at a time.

    Ring positions are 16-bit values: a split ring's free-running indices, or a packed
    ring's ``position | wrap counter << 15`` (the vhost-user encoding of its base).
    """

    cdef readonly uint16_t size
    cdef uint32_t hdr_len
    cdef readonly bint mrg_rxbuf
    cdef readonly bint event_idx
    cdef public int call_fd
    cdef uint16_t last_avail
    cdef uint16_t used_shadow       # next used slot to fill
    cdef uint16_t used_published    # used position the guest has been shown
    cdef uint16_t signalled_used    # used position at the last notify() decision
    cdef uint16_t signal_from       # used position at the last interrupt raised (watch())
    cdef uint16_t watched_used      # used and avail positions at the last watch()
    cdef uint16_t watched_avail
    cdef int unpublished            # chains completed since the last publish_used()
    # Where the next kick should come from: last_avail normally; while RX is starved
    # (buffers there, but too few for the next frame) the position after the last
    # available chain, so that enable_kick() waits for *new* buffers instead of
    # reporting the old ones forever.
    cdef uint16_t kick_point
    cdef uint16_t peek              # after walk() found no chain: where that chain would start
    cdef bint _broken
    cdef bint ready
    cdef uint8_t *desc
    cdef uint8_t *avail             # split: avail ring; packed: driver event suppression
    cdef uint8_t *used              # split: used ring; packed: device event suppression
    cdef Region *regions
    cdef int nregions
    cdef object region_refs         # keeps the mmaps behind `regions` alive
    cdef Segment *segs
    cdef int seg_cap
    cdef uint16_t *chain_head       # per chain walked: head (split) or buffer id (packed)
    cdef uint16_t *chain_ndesc      # per chain walked: ring slots it takes
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

    def __cinit__(self, int size, int hdr_len, bint mrg_rxbuf, bint event_idx, int call_fd,
                  long long base):
        if size < 1 or size > MAX_QUEUE_SIZE or (size & (size - 1)) != 0:
            raise ValueError(f"queue size {size} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        if hdr_len not in (10, 12) or (mrg_rxbuf and hdr_len != 12):
            raise ValueError(f"virtio-net header length {hdr_len} is not 10 or 12 (12 with MRG_RXBUF)")
        if not 0 <= base <= 0xFFFFFFFF:
            raise ValueError(f"base {base} is not a 32-bit value")
        self.size = size
        self.hdr_len = hdr_len
        self.mrg_rxbuf = mrg_rxbuf
        self.event_idx = event_idx
        self.call_fd = call_fd
        # Room for two worst-case chains: one chain always fits, and RX only walks
        # another while a whole worst-case chain still fits.
        self.seg_cap = 2 * (size + MAX_INDIRECT_ENTRIES)
        self.segs = <Segment *>malloc(self.seg_cap * sizeof(Segment))
        self.chain_head = <uint16_t *>malloc(size * sizeof(uint16_t))
        self.chain_ndesc = <uint16_t *>malloc(size * sizeof(uint16_t))
        self.chain_first_seg = <int *>malloc(size * sizeof(int))
        self.chain_nseg = <int *>malloc(size * sizeof(int))
        self.chain_capacity = <uint64_t *>malloc(size * sizeof(uint64_t))
        if (self.segs == NULL or self.chain_head == NULL or self.chain_first_seg == NULL
                or self.chain_nseg == NULL or self.chain_capacity == NULL
                or self.chain_ndesc == NULL):
            raise MemoryError()
        memset(self.counts, 0, sizeof(self.counts))
        memset(self.stats, 0, sizeof(self.stats))
        memset(self.reported, 0, sizeof(self.reported))
        self.region_refs = ()

    def __dealloc__(self):
        free(self.segs)
        free(self.chain_head)
        free(self.chain_ndesc)
        free(self.chain_first_seg)
        free(self.chain_nseg)
        free(self.chain_capacity)
        free(self.regions)

    # ----------------------------------------------------------------- setup

    def set_memory(self, regions, uint64_t desc_uva, uint64_t avail_uva, uint64_t used_uva) -> None:
        """Install a region table: a sequence of (gpa, uva, size, uint8 ndarray of size bytes).

        ``avail_uva``/``used_uva`` are the driver and device areas (split: avail and used
        rings; packed: the event suppression structures). Raises LookupError if a ring is
        not inside one region, ValueError if misaligned. On the first call the ring format
        reads where the guest and any earlier back-end left it (``start_positions``).
        """
        cdef Py_ssize_t count = len(regions)
        cdef Region *table = <Region *>malloc((count if count else 1) * sizeof(Region))
        cdef uint8_t[::1] view
        cdef Py_ssize_t i
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
        avail = self.uva_to_host(avail_uva, self.driver_area_bytes())
        used = self.uva_to_host(used_uva, self.device_area_bytes())
        if desc == NULL or avail == NULL or used == NULL:
            raise LookupError("a ring address is not inside one mapped region")
        if (<uintptr_t>desc) % 16 or (<uintptr_t>avail) % self.driver_area_align() or (<uintptr_t>used) % 4:
            raise ValueError("ring addresses are not aligned as virtio requires")
        first_time = self.desc == NULL
        self.desc = desc
        self.avail = avail
        self.used = used
        self.rings_installed(desc_uva)
        if first_time:
            self.kick_point = self.last_avail
            self.start_positions()
            self.signalled_used = self.used_published
            self.signal_from = self.used_published
        self.ready = True

    cdef uint64_t driver_area_bytes(self):
        return 0

    cdef uint64_t device_area_bytes(self):
        return 0

    cdef int driver_area_align(self):
        return 4

    cdef rings_installed(self, uint64_t desc_uva):
        """The ring pointers moved (a new region table)."""

    cdef start_positions(self):
        """First installation: settle used_shadow/used_published (may raise LookupError)."""

    cdef uint8_t *uva_to_host(self, uint64_t uva, uint64_t length):
        cdef int i
        for i in range(self.nregions):
            if (uva >= self.regions[i].uva and uva - self.regions[i].uva <= self.regions[i].size
                    and length <= self.regions[i].size - (uva - self.regions[i].uva)):
                return self.regions[i].host + (uva - self.regions[i].uva)
        return NULL

    cdef uint64_t uva_to_gpa(self, uint64_t uva):
        cdef int i
        for i in range(self.nregions):
            if uva >= self.regions[i].uva and uva - self.regions[i].uva < self.regions[i].size:
                return self.regions[i].gpa + (uva - self.regions[i].uva)
        return 0

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

    @property
    def base(self) -> int:
        """What GET_VRING_BASE hands back: where the guest's next buffers start."""
        return self.last_avail

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
            result.update(zip(self.position_names(), seen))
        return result

    cdef tuple position_names(self):
        return ()

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

    def tx_drain_rearm(self, FrameBatch batch not None, int max_frames) -> tuple:
        """``batch`` emptied, ``tx_drain``, ``notify`` if frames came, ``enable_kick`` if fewer
        than ``max_frames`` came: the kick's whole ring work in one call. Returns (frames,
        whether to drain again: the batch was full or buffers came meanwhile)."""
        if max_frames < 1:
            raise ValueError("max_frames must be positive")
        batch.n = 0  # (FrameBatch.clear)
        batch.fill = 0
        cdef long result = self.guarded(guarded_tx_drain_rearm, <void *>batch, max_frames)
        return result >> 1, bool(result & 1)

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

    def watch(self, bint tx) -> int:
        """The notification watchdog's look at this ring (see ``Virtqueue.watch``): bit 0, the
        ring moved since the last look; bit 1, an interrupt the guest asks for and did not get
        was raised now; bit 2 (``tx`` rings only, and only when it did not move), chains wait
        that no kick announced."""
        return self.guarded(guarded_watch, NULL, tx)

    def disable_kick(self) -> None:
        self.guarded(guarded_disable_kick, NULL, 0)

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

    cdef void break_ring(self, int reason) noexcept nogil:
        """Nothing in this ring can be trusted any more: stop it, counted under ``reason``."""
        self._broken = True
        self.count_error(reason)

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

    # ------------------------------------------- descriptors (both formats)

    cdef int add_buffer(self, uint64_t addr, uint32_t length, uint16_t flags, bint want_writable,
                        Segment *out, int *n, uint64_t *total) noexcept nogil:
        """Check one buffer descriptor (direction, mapping) and list it in ``out`` if non-empty."""
        cdef int reason
        if length == 0:
            return CHAIN_OK
        if ((flags & DESC_F_WRITE) != 0) != want_writable:
            return R_WRONG_DIRECTION
        reason = self.check_range(addr, length)
        if reason != CHAIN_OK:
            return reason
        out[n[0]].gpa = addr
        out[n[0]].length = length
        n[0] += 1
        total[0] += length
        return CHAIN_OK

    cdef int check_indirect(self, uint64_t addr, uint32_t length, uint16_t flags,
                            bint nested) noexcept nogil:
        """Check a descriptor pointing at an indirect table (CHAIN_OK: ``length // 16`` entries)."""
        if nested:
            return R_INDIRECT_NESTED
        if flags & DESC_F_NEXT:
            return R_INDIRECT_WITH_NEXT
        if length == 0 or length % DESC_SIZE or length // DESC_SIZE > MAX_INDIRECT_ENTRIES:
            return R_INDIRECT_BAD_LENGTH
        return self.check_range(addr, length)

    # ------------------------------------------- the ring format's part

    cdef int walk(self, int k, bint want_writable, Segment *out, int *nseg,
                  uint64_t *total) noexcept nogil:
        """Validate the ``k``-th available chain from last_avail and list its buffers.

        Chains are walked in order (k = 0, 1, ... since the last ``advance``); records
        chain_head[k] and chain_ndesc[k]. Returns CHAIN_OK, a refusal reason (the chain
        must still be completed), NO_CHAIN (``peek`` says where it would start) or
        RING_BROKEN. ``out`` must have room for size + MAX_INDIRECT_ENTRIES segments.
        """
        return RING_BROKEN

    cdef void complete(self, int k, uint32_t length) noexcept nogil:
        """Hand chain ``k`` back to the guest as used, ``length`` bytes written."""

    cdef void advance(self, int count, int first=0) noexcept nogil:
        """Move last_avail past chains first..first+count-1 (walked and completed; the chains
        before ``first`` were passed already)."""

    cdef void publish_used(self) noexcept nogil:
        """Make completed chains visible to the guest."""
        self.used_published = self.used_shadow
        self.unpublished = 0

    cdef bint _notify(self) noexcept nogil:
        return self._notify_from(self.signalled_used)

    cdef bint _notify_from(self, uint16_t old) noexcept nogil:
        """Interrupt the guest if it asked for one for the used chains from ``old`` on."""
        return False

    cdef bint _signal(self) noexcept nogil:
        """Write the call eventfd (if there is one) and count the interrupt."""
        cdef uint64_t one = 1
        self.signal_from = self.used_published
        if self.call_fd < 0:
            return False
        if c_write(self.call_fd, &one, 8) != 8:
            self.count_error(R_NOTIFY_FAILED)
            return False
        self.stats[S_NOTIFICATIONS] += 1
        return True

    cdef long watch_ring(self, bint tx) noexcept nogil:
        """``watch``'s work."""
        cdef long result = 0
        if self._broken or not self.ready:
            return 0
        if self.used_published != self.watched_used or self.last_avail != self.watched_avail:
            result |= 1
        self.watched_used = self.used_published
        self.watched_avail = self.last_avail
        # Asked again over everything since the last interrupt raised: a used_event (or flag)
        # the guest stored before we published, but which we read before it landed, counts now.
        if self.used_published != self.signal_from and self._notify_from(self.signal_from):
            result |= 2
        # A TX ring that did not move for a whole look and still has chains past kick_point
        # (== last_avail after every drain): they came without the kick the re-armed event
        # asked for. (A ring that moved may be mid-drain: a drain left to the next loop turn.)
        if tx and not result & 1 and self._enable_kick():
            result |= 4
        return result

    cdef bint _enable_kick(self) noexcept nogil:
        return False

    cdef void _disable_kick(self) noexcept nogil:
        pass

    cdef void read_positions(self, uint16_t *seen) noexcept nogil:
        """The guest's and our ring fields named by position_names()."""


include "virtq_split.pxi"
include "virtq_packed.pxi"


# The two halves of the per-frame work, as functions over a RingQueue (a class body cannot include files).
include "virtq_tx.pxi"
include "virtq_rx.pxi"
include "virtq_rxdirect.pxi"   # RX buffers for another kernel (ext/rx_direct.pxd)


# Kernel entry points in the shape vq_guarded_call takes: (queue, argument, number).
cdef long guarded_tx_drain(void *queue, void *batch, long max_frames) noexcept nogil:
    return tx_drain_frames(<RingQueue>queue, <FrameBatch>batch, <int>max_frames)


cdef long guarded_tx_drain_rearm(void *queue, void *batch, long max_frames) noexcept nogil:
    """frames * 2, plus 1 when more may wait (see ``tx_drain_rearm``)."""
    cdef long frames = tx_drain_frames(<RingQueue>queue, <FrameBatch>batch, <int>max_frames)
    if frames:
        (<RingQueue>queue)._notify()
    if frames < max_frames:
        return frames * 2 + (1 if (<RingQueue>queue)._enable_kick() else 0)
    return frames * 2 + 1


cdef long guarded_rx_push(void *queue, void *batch, long start) noexcept nogil:
    return rx_push_frames(<RingQueue>queue, <FrameBatch>batch, start)


cdef long guarded_notify(void *queue, void *unused, long n) noexcept nogil:
    return (<RingQueue>queue)._notify()


cdef long guarded_signal(void *queue, void *unused, long n) noexcept nogil:
    return (<RingQueue>queue)._signal()


cdef long guarded_watch(void *queue, void *unused, long tx) noexcept nogil:
    return (<RingQueue>queue).watch_ring(tx != 0)


cdef long guarded_enable_kick(void *queue, void *unused, long n) noexcept nogil:
    return (<RingQueue>queue)._enable_kick()


cdef long guarded_disable_kick(void *queue, void *unused, long n) noexcept nogil:
    (<RingQueue>queue)._disable_kick()
    return 0


cdef long guarded_positions(void *queue, void *out, long n) noexcept nogil:
    (<RingQueue>queue).read_positions(<uint16_t *>out)
    return 0
