"""The guest side of a virtqueue, split or packed: the one ring driver of the test kit.

``SplitRing`` plays a guest's virtio driver for one split ring through numpy
views of the descriptor table, the avail ring and the used ring in guest
memory, so that what a back-end sees is what a guest would have written;
``PackedRing`` (testkit/packed_ring.py) does the same for a packed ring with
the same methods. Their users need different things, all from the same class:

- the virtqueue kernel tests write raw (also hostile) descriptors, chain them
  at the next descriptors in ring order (``add_chain``), publish heads, move
  the indices and event fields by hand and read used entries (``take_used``);
- the test front-end takes descriptors from a free list with a token per chain
  (``queue_chain``) and gets the tokens back (``collect_used``);
- the benchmark guest gives every descriptor one fixed buffer for the life of
  the ring (``attach_buffers``), so posting ``k`` chains is one store of the
  avail index (``expose``), and sleeps on the call eventfd (``wait``) so that
  on a small machine it does not steal the back-end's CPU.

Notifications follow what was negotiated, as Linux's virtio_ring does: with
VIRTIO_F_EVENT_IDX (``event_idx``) the driver kicks when the device's
avail_event asks and asks for interrupts through used_event; without it, the
device writes no event index (passt does not), so the driver kicks on every
publish unless the device set VIRTQ_USED_F_NO_NOTIFY, and turns interrupts on
and off with VIRTQ_AVAIL_F_NO_INTERRUPT.
"""

from __future__ import annotations

import os
import select
import struct
from dataclasses import dataclass
from typing import Protocol

import numpy as np

# Descriptor, avail and used flags.
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

DESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])
_DESC = struct.Struct("<QIHH")


def need_event(event: int, new: int, old: int) -> bool:
    """virtio's vring_need_event: did the index move past the other side's event index?"""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


def pack_desc(addr: int, length: int, flags: int, next_index: int = 0) -> bytes:
    """One descriptor as the guest stores it (for indirect tables anywhere in memory)."""
    return _DESC.pack(addr, length, flags, next_index)


@dataclass(frozen=True)
class RingLayout:
    """Guest-physical addresses of a split ring's three areas."""

    size: int
    desc_gpa: int
    avail_gpa: int  # packed: the driver event suppression area
    used_gpa: int  # packed: the device event suppression area
    packed: bool = False

    @classmethod
    def at(cls, gpa: int, size: int, used_align: int = 4) -> RingLayout:
        """The areas back to back from ``gpa``; the used ring aligned to ``used_align``.

        4 is the minimum virtio asks; Linux puts the used ring on its own page (4096).
        """
        desc = gpa
        avail = desc + 16 * size
        used = (avail + 6 + 2 * size + used_align - 1) & ~(used_align - 1)
        return cls(size, desc, avail, used)

    @classmethod
    def packed_at(cls, gpa: int, size: int) -> RingLayout:
        """A packed ring from ``gpa``: descriptors, then the driver and device event areas."""
        return cls(size, gpa, gpa + 16 * size, gpa + 16 * size + 4, packed=True)

    @property
    def end(self) -> int:
        return self.used_gpa + (4 if self.packed else 6 + 8 * self.size)


class RingMemory(Protocol):
    """What a ring needs of guest memory (``GuestMemoryImage`` has it)."""

    def view(self, gpa: int, length: int) -> np.ndarray: ...

    def write(self, gpa: int, data: bytes) -> None: ...

    def uva(self, gpa: int) -> int: ...


class GuestRing:
    """What both ring formats' drivers share: addresses, in-flight counts, waiting.

    ``avail_idx`` and ``used_seen`` are free-running 16-bit counts (split: chains;
    packed: descriptors, so that slot = count & mask either way).
    """

    layout: RingLayout
    memory: RingMemory
    size: int
    mask: int
    avail_idx: int
    used_seen: int
    call_fd: int | None
    # VIRTIO_F_EVENT_IDX negotiated: kicks and interrupts by event index, else by flags.
    event_idx: bool

    def _take_ring(self, memory: RingMemory, layout: RingLayout, kick_fd: int | None,
                   call_fd: int | None, event_idx: bool) -> int:
        """Record what every driver keeps about its ring; returns the ring size."""
        n = layout.size
        if n <= 0 or n & (n - 1):
            raise ValueError("ring size must be a power of two")
        self.memory = memory
        self.layout = layout
        self.size = n
        self.mask = n - 1
        self.kick_fd = kick_fd
        self.call_fd = call_fd
        self.event_idx = event_idx
        return n

    @property
    def desc_gpa(self) -> int:
        return self.layout.desc_gpa

    @property
    def avail_gpa(self) -> int:
        return self.layout.avail_gpa

    @property
    def used_gpa(self) -> int:
        return self.layout.used_gpa

    @property
    def ring_uvas(self) -> tuple[int, int, int]:
        """Front-end virtual addresses of the descriptors and the driver and device areas."""
        uva = self.memory.uva
        return uva(self.layout.desc_gpa), uva(self.layout.avail_gpa), uva(self.layout.used_gpa)

    @property
    def in_flight(self) -> int:
        """Chains (packed: descriptors) published and not yet seen used."""
        return (self.avail_idx - self.used_seen) & 0xFFFF

    @property
    def free(self) -> int:
        return self.size - self.in_flight

    def has_used(self) -> bool:
        raise NotImplementedError

    def set_used_event(self, value: int) -> None:
        raise NotImplementedError

    def arm(self, value: int) -> None:
        """Ask for an interrupt once the chain at ``value`` is used (with EVENT_IDX;
        without it, at the next used chain: the device knows no event index)."""
        raise NotImplementedError

    def quiet(self) -> None:
        """No interrupts while we poll."""
        raise NotImplementedError

    def slot(self, position: int) -> int:
        """The descriptor (and buffer) of the chain at avail position ``position``."""
        return position & self.mask

    def wait(self, timeout: float, batch: int = 1) -> bool:
        """Sleep on the call fd until the device completes something (or ``timeout``).

        True if it did. The interrupt is asked for once ``batch`` more chains are
        used; progress seen before sleeping returns at once.
        """
        if self.has_used():
            return True
        self.arm(self.used_seen + max(batch, 1) - 1)
        if self.has_used():  # it may have come before the arm
            self.quiet()
            return True
        if self.call_fd is None:
            raise RuntimeError("this ring has no call fd to wait on")
        ready, _, _ = select.select([self.call_fd], [], [], timeout)
        if ready:
            try:
                os.eventfd_read(self.call_fd)
            except BlockingIOError:
                pass
        self.quiet()
        return self.has_used()

    def wait_for_room(self, timeout: float) -> bool:
        """``wait`` on a full TX ring: interrupt when 3/4 of the chains in flight are used.

        That is what Linux's virtio-net asks for when its queue is full
        (``virtqueue_enable_cb_delayed``), not an interrupt at the first used chain.
        """
        return self.wait(timeout, batch=self.in_flight * 3 // 4)


class SplitRing(GuestRing):
    """The driver's half of one split virtqueue of ``layout.size`` entries.

    The ring is zeroed: a fresh device sees flags 0, idx 0 everywhere. A ring
    given a ``kick_fd`` kicks when the device asks for it (``expose``); without
    one the owner kicks. ``call_fd`` is what ``wait`` sleeps on.
    """

    def __init__(
        self,
        memory: RingMemory,
        layout: RingLayout,
        kick_fd: int | None = None,
        call_fd: int | None = None,
        event_idx: bool = True,
    ) -> None:
        n = self._take_ring(memory, layout, kick_fd, call_fd, event_idx)
        self.desc = memory.view(layout.desc_gpa, 16 * n).view(DESC_DTYPE)
        # avail: flags, idx, ring[n], used_event
        self.avail = memory.view(layout.avail_gpa, 6 + 2 * n).view("<u2")
        used = memory.view(layout.used_gpa, 6 + 8 * n)
        self.used_head = used[:4].view("<u2")  # flags, idx
        self.used_ring = used[4 : 4 + 8 * n].view("<u4").reshape(n, 2)  # (id, len)
        self._avail_event = used[4 + 8 * n :].view("<u2")
        self.desc[:] = 0
        self.avail[:] = 0
        used[:] = 0
        self.avail_idx = 0
        self.used_seen = 0
        self.next_desc = 0  # where add_chain writes next
        self.kicks = 0
        self.buffers: np.ndarray | None = None  # attach_buffers
        self._free_descs = list(range(n - 1, -1, -1))  # queue_chain; pop() gives 0, 1, ...
        self._tokens: dict[int, tuple[object, int]] = {}  # head -> (token, chain length)

    # ---- indices ----------------------------------------------------------------

    def start_at(self, base: int) -> None:
        """Both indices at ``base``, in memory too, as after a migration."""
        self.avail_idx = self.used_seen = base & 0xFFFF
        self.avail[1] = self.avail_idx
        self.used_head[1] = self.used_seen

    def used_idx(self) -> int:
        return int(self.used_head[1])

    def used_flags(self) -> int:
        return int(self.used_head[0])

    def avail_event(self) -> int:
        """The device's avail_event (after the used ring)."""
        return int(self._avail_event[0])

    def has_used(self) -> bool:
        return self.used_idx() != self.used_seen

    def set_avail_idx(self, value: int) -> None:
        """Store avail idx in memory only (hostile tests: an index the driver never reached)."""
        self.avail[1] = value & 0xFFFF

    def set_avail_flags(self, flags: int) -> None:
        self.avail[0] = flags

    def set_used_event(self, value: int) -> None:
        """used_event (after the avail ring): interrupt when used idx passes it."""
        self.avail[2 + self.size] = value & 0xFFFF

    # ---- descriptors and the avail ring ------------------------------------------

    def write_desc(
        self,
        index: int,
        addr: int,
        length: int,
        flags: int,
        next_index: int = 0,
        table_gpa: int | None = None,
    ) -> None:
        """One raw descriptor, in the ring's table or in an indirect table at ``table_gpa``."""
        if table_gpa is None:
            self.desc[index] = (addr, length, flags, next_index)
        else:
            self.memory.write(table_gpa + 16 * index, pack_desc(addr, length, flags, next_index))

    def _link(
        self, indices: list[int], parts: list[tuple[int, int, int]], table_gpa: int | None = None
    ) -> int:
        """Write ``(addr, len, flags)`` parts through ``indices``, linked by NEXT; the head."""
        for position, (addr, length, flags) in enumerate(parts):
            last = position == len(parts) - 1
            following = 0 if last else indices[position + 1]
            self.write_desc(indices[position], addr, length,
                            flags | (0 if last else VIRTQ_DESC_F_NEXT), following, table_gpa)
        return indices[0]

    def write_indirect(self, table_gpa: int, parts: list[tuple[int, int, int]]) -> None:
        """An indirect table at ``table_gpa`` holding ``parts``, linked in order."""
        self._link(list(range(len(parts))), parts, table_gpa)

    def add_chain(self, parts: list[tuple[int, int, int]]) -> int:
        """Write parts as a chain at the next descriptors in ring order (in flight or not)."""
        indices = [(self.next_desc + i) % self.size for i in range(len(parts))]
        self.next_desc = (self.next_desc + len(parts)) % self.size
        return self._link(indices, parts)

    def publish(self, *heads: int) -> None:
        """Put chain heads in the avail ring and expose them."""
        for position, head in enumerate(heads):
            self.avail[2 + ((self.avail_idx + position) & self.mask)] = head
        self.expose(len(heads))

    def expose(self, count: int) -> None:
        """Store avail idx ``count`` entries further; kick if the device asked for it.

        The index is stored last: the device reads entries only below it (and x86
        keeps the earlier stores before this one).
        """
        if count <= 0:
            return
        old = self.avail_idx
        self.avail_idx = (old + count) & 0xFFFF
        self.avail[1] = self.avail_idx
        if self.kick_fd is not None and self.device_wants_kick(old):
            os.eventfd_write(self.kick_fd, 1)
            self.kicks += 1

    def device_wants_kick(self, old: int) -> bool:
        """Whether moving avail idx from ``old`` to ``avail_idx`` needs a kick (Linux's
        virtqueue_kick_prepare_split): avail_event with EVENT_IDX, else the used flags."""
        if self.event_idx:
            return need_event(self.avail_event(), self.avail_idx, old)
        return not self.used_flags() & VIRTQ_USED_F_NO_NOTIFY

    # ---- the used ring -------------------------------------------------------------

    def take_used(self) -> list[tuple[int, int]]:
        """New used entries as (head, length) since the last call."""
        start, count = self.consume_used()
        idx = (start + np.arange(count)) & self.mask
        return [(head, length) for head, length in self.used_ring[idx].tolist()]

    def consume_used(self) -> tuple[int, int]:
        """Completed chains since the last call: (first avail position, count)."""
        start = self.used_seen
        now = self.used_idx()
        self.used_seen = now
        return start, (now - start) & 0xFFFF

    # ---- chains with tokens (a long-running guest) --------------------------------

    @property
    def free_descriptors(self) -> int:
        return len(self._free_descs)

    def queue_chain(self, parts: list[tuple[int, int, int]], token: object) -> bool:
        """Publish ``(addr, len, flags)`` parts on free descriptors; False if they ran out.

        ``collect_used`` gives ``token`` back when the device has used the chain.
        """
        if not parts or len(parts) > len(self._free_descs):
            return False
        head = self._link([self._free_descs.pop() for _ in parts], parts)
        self._tokens[head] = (token, len(parts))
        self.publish(head)
        return True

    def collect_used(self) -> list[tuple[object, int]]:
        """``(token, written_length)`` per chain the device completed; frees its descriptors.

        Then asks for an interrupt on the very next used entry (used_event).
        """
        done = []
        for head, length in self.take_used():
            entry = self._tokens.pop(head, None)
            if entry is None:
                raise RuntimeError(f"device completed descriptor {head}, which is not in flight")
            token, chain_length = entry
            index = head
            for _ in range(chain_length):
                self._free_descs.append(index)
                index = int(self.desc["next"][index])
            done.append((token, length))
        self.arm(self.used_seen)
        return done

    # ---- one fixed buffer per descriptor (the benchmark guest) ---------------------

    def attach_buffers(self, buf_gpa: int, buf_size: int, writable: bool) -> None:
        """Descriptor ``i`` owns buffer ``i`` at ``buf_gpa + i * buf_size`` for good.

        The avail ring holds the identity permutation, so the chain at avail position
        ``p`` is descriptor ``slot(p)``. That relies on the device completing chains
        in order, which every virtio-net back-end does for a single queue;
        ``check_in_order`` verifies it.
        """
        n = self.size
        self.buffers = self.memory.view(buf_gpa, n * buf_size).reshape(n, buf_size)
        self.desc["addr"] = buf_gpa + np.arange(n, dtype=np.uint64) * buf_size
        self.desc["len"] = buf_size
        self.desc["flags"] = VIRTQ_DESC_F_WRITE if writable else 0
        self.desc["next"] = 0
        self.avail[2 : 2 + n] = np.arange(n, dtype=np.uint16)
        self.quiet()

    def set_buffer_length(self, slots: slice | int, length: int) -> None:
        """How many bytes of buffer ``slots`` the chains offer (from now on)."""
        self.desc["len"][slots] = length

    def used_lengths(self, start: int, count: int) -> np.ndarray:
        idx = (start + np.arange(count)) & self.mask
        return self.used_ring[idx, 1]

    def check_in_order(self, start: int, count: int) -> None:
        idx = (start + np.arange(count)) & self.mask
        if count and not np.array_equal(self.used_ring[idx, 0], idx):
            raise RuntimeError("the back-end completed chains out of order")

    # ---- waiting for the device (EVENT_IDX) ----------------------------------------

    def arm(self, value: int) -> None:
        if self.event_idx:
            self.set_used_event(value)
        else:
            self.set_avail_flags(0)

    def quiet(self) -> None:
        """No interrupts while we poll: used_event half a ring-index space away (EVENT_IDX),
        else VIRTQ_AVAIL_F_NO_INTERRUPT."""
        if self.event_idx:
            self.set_used_event(self.used_seen + 0x7FFF)
        else:
            self.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
