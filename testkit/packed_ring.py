"""The guest side of a packed virtqueue (virtio 1.1+): ``PackedRing``, ``SplitRing``'s twin.

One descriptor ring of ``{u64 addr, u32 len, u16 id, u16 flags}`` plus two 4-byte
event suppression areas (``{u16 off_wrap, u16 flags}``): the driver's (when it
wants interrupts) and the device's (when it wants kicks). A descriptor is
available when its AVAIL flag equals the driver's wrap counter and its USED flag
does not; the device hands a chain back with one descriptor where the chain
started, AVAIL and USED both equal to its wrap counter, carrying the buffer id.

The driver keeps free-running 16-bit descriptor counts (``avail_idx``,
``used_seen``): slot = count & mask and the wrap counter is 1 on even laps, so
the split driver's index arithmetic (``in_flight``, ``slot``, ``wait``) holds.
Buffer ids are the chain's first slot, so ``take_used`` answers ``(head, len)``
as ``SplitRing`` does.
"""

from __future__ import annotations

import os

import numpy as np

from testkit.guest_ring import (
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    GuestRing,
    RingLayout,
    RingMemory,
    need_event,
)

PACKED_DESC_F_AVAIL = 1 << 7
PACKED_DESC_F_USED = 1 << 15
EVENT_FLAG_ENABLE = 0
EVENT_FLAG_DISABLE = 1
EVENT_FLAG_DESC = 2
WRAP_BIT = 1 << 15
FRESH_BASE = 0x80008000  # both positions at slot 0, wrap counters 1

PACKED_DESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("id", "<u2"), ("flags", "<u2")])


def pack_packed_desc(addr: int, length: int, flags: int, buffer_id: int = 0) -> bytes:
    """One packed descriptor as the guest stores it (indirect tables anywhere in memory)."""
    return np.array([(addr, length, buffer_id, flags)], dtype=PACKED_DESC_DTYPE).tobytes()


class PackedRing(GuestRing):
    """The driver's half of one packed virtqueue of ``layout.size`` descriptors."""

    def __init__(
        self,
        memory: RingMemory,
        layout: RingLayout,
        kick_fd: int | None = None,
        call_fd: int | None = None,
        event_idx: bool = True,
    ) -> None:
        n = self._take_ring(memory, layout, kick_fd, call_fd, event_idx)
        self.desc = memory.view(layout.desc_gpa, 16 * n).view(PACKED_DESC_DTYPE)
        self.driver_event = memory.view(layout.avail_gpa, 4).view("<u2")  # off_wrap, flags
        self.device_event = memory.view(layout.used_gpa, 4).view("<u2")
        self.desc[:] = 0
        self.driver_event[:] = 0
        self.device_event[:] = 0
        self.avail_idx = 0  # descriptors made available
        self.used_seen = 0  # descriptors seen used
        self.next_desc = 0  # where add_chain writes next (a count, like avail_idx)
        self.kicks = 0
        self.buffers: np.ndarray | None = None
        self.post_lengths = np.zeros(n, dtype=np.uint32)
        self._buffer_flags = 0
        self._chain_length: dict[int, int] = {}  # buffer id -> descriptors in its chain
        self._head_flags: dict[int, int] = {}  # head written by add_chain, not yet published
        self._tokens: dict[int, object] = {}

    # ---- positions ---------------------------------------------------------------

    def wrap(self, count: int) -> int:
        """The wrap counter at descriptor count ``count``: 1 on the first lap."""
        return 1 ^ ((count // self.size) & 1)

    def position(self, count: int) -> int:
        """``count`` as the ring encodes a position: slot | wrap << 15."""
        return (count & self.mask) | self.wrap(count) << 15

    def count_at(self, position: int) -> int:
        """The first count (of the two laps) with this slot and wrap counter."""
        slot = position & 0x7FFF
        return slot if position & WRAP_BIT else slot + self.size

    def avail_bits(self, count: int) -> int:
        return PACKED_DESC_F_AVAIL if self.wrap(count) else PACKED_DESC_F_USED

    def start_at(self, base: int) -> None:
        """Both counts where a packed base puts them (low half: avail, high half: used)."""
        self.avail_idx = self.next_desc = self.count_at(base & 0xFFFF)
        self.used_seen = self.count_at(base >> 16)
        # Every descriptor as the device left it: used in this lap before used_seen's slot,
        # in the previous lap from there on (a zeroed ring would read as used in odd laps).
        slots = np.arange(self.size)
        lap_wrap = np.where(slots < (self.used_seen & self.mask), self.wrap(self.used_seen),
                            1 - self.wrap(self.used_seen))
        self.desc["flags"] = np.where(lap_wrap == 1, PACKED_DESC_F_AVAIL | PACKED_DESC_F_USED, 0)

    @property
    def base(self) -> int:
        return self.position(self.avail_idx) | self.position(self.used_seen) << 16

    # ---- descriptors ---------------------------------------------------------------

    def write_desc(self, index: int, addr: int, length: int, flags: int, buffer_id: int = 0,
                   table_gpa: int | None = None) -> None:
        """One raw descriptor (flags as given), in the ring or in an indirect table."""
        if table_gpa is None:
            self.desc[index] = (addr, length, buffer_id, flags)
        else:
            self.memory.write(table_gpa + 16 * index,
                              pack_packed_desc(addr, length, flags, buffer_id))

    def write_indirect(self, table_gpa: int, parts: list[tuple[int, int, int]]) -> None:
        """An indirect table at ``table_gpa`` holding ``parts``, used in order (no NEXT)."""
        for index, (addr, length, flags) in enumerate(parts):
            self.write_desc(index, addr, length, flags, table_gpa=table_gpa)

    def add_chain(self, parts: list[tuple[int, int, int]], buffer_id: int | None = None) -> int:
        """Write parts at the next descriptors; all but the head available. Returns the head.

        The head becomes available at ``publish`` (a driver makes it available last).
        Every descriptor carries the buffer id (the head slot unless given).
        """
        head = self.next_desc & self.mask
        chain_id = head if buffer_id is None else buffer_id
        for offset, (addr, length, flags) in enumerate(parts):
            count = self.next_desc + offset
            full = flags | self.avail_bits(count)
            if offset < len(parts) - 1:
                full |= VIRTQ_DESC_F_NEXT
            slot = count & self.mask
            self.desc[slot] = (addr, length, chain_id, self.desc["flags"][slot] if offset == 0 else full)
            if offset == 0:
                self._head_flags[head] = full
        self.next_desc = (self.next_desc + len(parts)) & 0xFFFF
        self._chain_length[chain_id] = len(parts)
        return head

    def publish(self, *heads: int) -> None:
        """Make chains written by ``add_chain`` available, in order; kick if asked."""
        old = self.avail_idx
        for head in heads:
            flags = self._head_flags.pop(head)
            self.desc["flags"][head] = flags
            self.avail_idx = (self.avail_idx + self._chain_length[int(self.desc["id"][head])]) & 0xFFFF
        self._maybe_kick(old)

    def expose(self, count: int) -> None:
        """Make the next ``count`` one-descriptor chains of ``attach_buffers`` available."""
        if count <= 0:
            return
        old = self.avail_idx
        counts = (old + np.arange(count)) & 0xFFFF
        slots = counts & self.mask
        self.desc["id"][slots] = slots
        wraps = 1 ^ ((counts // self.size) & 1)
        self.desc["len"][slots] = self.post_lengths[slots]  # the device wrote used lengths there
        self.desc["flags"][slots] = self._buffer_flags | np.where(
            wraps == 1, PACKED_DESC_F_AVAIL, PACKED_DESC_F_USED)
        self.avail_idx = (old + count) & 0xFFFF
        self._maybe_kick(old)

    def _maybe_kick(self, old: int) -> None:
        if self.kick_fd is None or old == self.avail_idx:
            return
        off_wrap, flags = (int(v) for v in self.device_event)
        if flags == EVENT_FLAG_DISABLE:
            return
        if flags == EVENT_FLAG_DESC:
            # The latest count up to avail_idx with the event's slot and wrap counter.
            lap = 2 * self.size
            event = (self.avail_idx - ((self.avail_idx - self.count_at(off_wrap)) % lap)) & 0xFFFF
            if not need_event(event, self.avail_idx, old):
                return
        os.eventfd_write(self.kick_fd, 1)
        self.kicks += 1

    def device_event_state(self) -> tuple[int, int]:
        """(off_wrap, flags) the device wrote: when it wants kicks."""
        return int(self.device_event[0]), int(self.device_event[1])

    def set_driver_event(self, off_wrap: int, flags: int) -> None:
        self.driver_event[0] = off_wrap
        self.driver_event[1] = flags

    # ---- used descriptors ------------------------------------------------------------

    def _is_used(self, count: int) -> bool:
        flags = int(self.desc["flags"][count & self.mask])
        wrap = self.wrap(count)
        return bool(flags & PACKED_DESC_F_AVAIL) == wrap and bool(flags & PACKED_DESC_F_USED) == wrap

    def has_used(self) -> bool:
        return self._is_used(self.used_seen)

    def take_used(self) -> list[tuple[int, int]]:
        """New used descriptors as (buffer id, length) since the last call."""
        done = []
        while self._is_used(self.used_seen) and len(done) < self.size:
            slot = self.used_seen & self.mask
            buffer_id, length = int(self.desc["id"][slot]), int(self.desc["len"][slot])
            done.append((buffer_id, length))
            self.used_seen = (self.used_seen + self._chain_length.get(buffer_id, 1)) & 0xFFFF
        return done

    def consume_used(self) -> tuple[int, int]:
        """Completed one-descriptor chains since the last call: (first count, how many)."""
        start = self.used_seen
        return start, len(self.take_used())

    # ---- chains with tokens (a long-running guest) --------------------------------

    @property
    def free_descriptors(self) -> int:
        return self.free

    def queue_chain(self, parts: list[tuple[int, int, int]], token: object) -> bool:
        """Publish parts on the next free descriptors; False if too few are free."""
        if not parts or len(parts) > self.free:
            return False
        head = self.add_chain(parts)
        self._tokens[head] = token
        self.publish(head)
        return True

    def collect_used(self) -> list[tuple[object, int]]:
        """``(token, written_length)`` per chain the device completed; then asks for an
        interrupt on the very next used descriptor."""
        done = []
        for buffer_id, length in self.take_used():
            if buffer_id not in self._tokens:
                raise RuntimeError(f"device completed buffer {buffer_id}, which is not in flight")
            done.append((self._tokens.pop(buffer_id), length))
        self.arm(self.used_seen)
        return done

    # ---- one fixed buffer per descriptor (the benchmark guest) ---------------------

    def attach_buffers(self, buf_gpa: int, buf_size: int, writable: bool) -> None:
        """Slot ``i`` owns buffer ``i`` for good; ``expose`` makes slots available in order."""
        n = self.size
        self.buffers = self.memory.view(buf_gpa, n * buf_size).reshape(n, buf_size)
        self.desc["addr"] = buf_gpa + np.arange(n, dtype=np.uint64) * buf_size
        self.post_lengths = np.full(n, buf_size, dtype=np.uint32)
        self._buffer_flags = VIRTQ_DESC_F_WRITE if writable else 0
        self.quiet()

    def set_buffer_length(self, slots: slice | int, length: int) -> None:
        """How many bytes of buffer ``slots`` the next ``expose`` offers."""
        self.post_lengths[slots] = length

    def used_lengths(self, start: int, count: int) -> np.ndarray:
        return self.desc["len"][(start + np.arange(count)) & self.mask]

    def check_in_order(self, start: int, count: int) -> None:
        idx = (start + np.arange(count)) & self.mask
        if count and not np.array_equal(self.desc["id"][idx], idx):
            raise RuntimeError("the back-end completed chains out of order")

    # ---- waiting for the device (event suppression) ----------------------------------

    def set_used_event(self, value: int) -> None:
        """Interrupt when the descriptor at count ``value`` is used (EVENT_IDX's DESC mode)."""
        self.set_driver_event(self.position(value & 0xFFFF), EVENT_FLAG_DESC)

    def arm(self, value: int) -> None:
        if self.event_idx:
            self.set_used_event(value)
        else:  # the DESC mode is only for a driver that negotiated EVENT_IDX
            self.set_driver_event(0, EVENT_FLAG_ENABLE)

    def quiet(self) -> None:
        self.set_driver_event(0, EVENT_FLAG_DISABLE)
