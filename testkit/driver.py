"""The guest side of a split virtqueue, for the test front-end.

``GuestMemoryImage`` is a memfd laid out like a small QEMU pc guest: two
regions with a hole between them, each with its own (made-up) front-end
virtual address, so that a back-end that confuses guest-physical and
front-end virtual addresses fails loudly. ``SplitRingDriver`` plays the
guest's virtio driver for one ring: descriptor table, avail ring, used ring.
``SlotAllocator`` hands out fixed-size buffers from both regions.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

from vhostnet.vhost_user.codec import MemoryRegion

# Descriptor flags.
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")

# QEMU's pc layout below 4 GiB: low RAM, then the VGA/ROM hole, then the rest.
LOW_RAM_END = 0xA0000
HIGH_RAM_START = 0xC0000
# Made-up front-end virtual addresses, deliberately unrelated to each other
# and to the guest-physical addresses.
LOW_RAM_UVA = 0x7F3A_0000_0000
HIGH_RAM_UVA = 0x7F5C_0004_0000

MIN_MEMORY_SIZE = 16 << 20


class GuestAddressError(ValueError):
    """A guest-physical range that is not inside one region."""


@dataclass(frozen=True)
class ImageRegion:
    region: MemoryRegion

    def contains_gpa(self, gpa: int, length: int) -> bool:
        start = self.region.guest_phys_addr
        return start <= gpa and gpa + length <= start + self.region.memory_size


class GuestMemoryImage:
    """A memfd mapped into this process, presented as two guest RAM regions."""

    def __init__(self, size: int) -> None:
        if size < MIN_MEMORY_SIZE:
            raise ValueError(f"guest memory must be at least {MIN_MEMORY_SIZE} bytes")
        self.size = size
        self.fd = os.memfd_create("vhostnet-guest", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        # gpa == memfd offset here, as in QEMU's pc machine below 4 GiB.
        self.regions = (
            ImageRegion(MemoryRegion(0, LOW_RAM_END, LOW_RAM_UVA, 0)),
            ImageRegion(
                MemoryRegion(HIGH_RAM_START, size - HIGH_RAM_START, HIGH_RAM_UVA, HIGH_RAM_START)
            ),
        )

    def memory_regions(self) -> list[MemoryRegion]:
        return [r.region for r in self.regions]

    def _offset(self, gpa: int, length: int) -> int:
        for image_region in self.regions:
            if image_region.contains_gpa(gpa, length):
                region = image_region.region
                return region.mmap_offset + gpa - region.guest_phys_addr
        raise GuestAddressError(f"gpa {gpa:#x}+{length} is not inside one region")

    def uva(self, gpa: int) -> int:
        """The front-end virtual address of a guest-physical address (for ring addresses)."""
        for image_region in self.regions:
            if image_region.contains_gpa(gpa, 1):
                region = image_region.region
                return region.userspace_addr + gpa - region.guest_phys_addr
        raise GuestAddressError(f"gpa {gpa:#x} is not inside a region")

    def read(self, gpa: int, length: int) -> bytes:
        offset = self._offset(gpa, length)
        return self.map[offset : offset + length]

    def write(self, gpa: int, data: bytes) -> None:
        offset = self._offset(gpa, len(data))
        self.map[offset : offset + len(data)] = data

    def read_u16(self, gpa: int) -> int:
        return _U16.unpack_from(self.map, self._offset(gpa, 2))[0]

    def write_u16(self, gpa: int, value: int) -> None:
        _U16.pack_into(self.map, self._offset(gpa, 2), value & 0xFFFF)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


class SlotAllocator:
    """Fixed-size buffers from several guest-physical ranges, interleaved.

    Interleaving means consecutive allocations alternate between regions, so
    both the low and the high region carry packet data.
    """

    def __init__(self, ranges: list[tuple[int, int]], slot_size: int) -> None:
        self.slot_size = slot_size
        per_range = [list(range(start, end - slot_size + 1, slot_size)) for start, end in ranges]
        self._free: list[int] = []
        for i in range(max(len(r) for r in per_range)):
            self._free.extend(r[i] for r in per_range if i < len(r))
        self._free.reverse()  # pop() from the end hands them out in order
        self.capacity = len(self._free)

    def alloc(self) -> int | None:
        return self._free.pop() if self._free else None

    def free(self, gpa: int) -> None:
        self._free.append(gpa)

    @property
    def available(self) -> int:
        return len(self._free)


@dataclass(frozen=True)
class RingLayout:
    """Guest-physical addresses of a split ring's three areas."""

    size: int
    desc_gpa: int
    avail_gpa: int
    used_gpa: int

    @classmethod
    def at(cls, gpa: int, size: int) -> RingLayout:
        desc = gpa
        avail = desc + 16 * size
        used = (avail + 6 + 2 * size + 3) & ~3
        return cls(size, desc, avail, used)

    @property
    def end(self) -> int:
        return self.used_gpa + 6 + 8 * self.size


class SplitRingDriver:
    """The driver's half of one split virtqueue.

    Chains are added with a token (any object); ``collect_used()`` returns
    ``(token, written_length)`` for each chain the device has completed and
    frees its descriptors.
    """

    def __init__(self, memory: GuestMemoryImage, layout: RingLayout) -> None:
        size = layout.size
        if size <= 0 or size & (size - 1):
            raise ValueError("ring size must be a power of two")
        self.memory = memory
        self.layout = layout
        self.size = size
        self._free_descs = list(range(size - 1, -1, -1))
        self._tokens: dict[int, tuple[object, int]] = {}  # head -> (token, chain length)
        self._next: list[int] = [0] * size
        self.avail_idx = 0
        self.last_used_idx = 0
        # Zero the whole ring: a fresh device sees flags 0, idx 0 everywhere.
        memory.write(layout.desc_gpa, bytes(layout.end - layout.desc_gpa))

    @property
    def free_descriptors(self) -> int:
        return len(self._free_descs)

    @property
    def in_flight(self) -> int:
        return len(self._tokens)

    def add_chain(self, buffers: list[tuple[int, int, bool]], token: object) -> bool:
        """Queue a chain of (gpa, length, device_writable); False if descriptors ran out."""
        if not buffers or len(buffers) > len(self._free_descs):
            return False
        indices = [self._free_descs.pop() for _ in buffers]
        for position, (gpa, length, writable) in enumerate(buffers):
            index = indices[position]
            last = position == len(buffers) - 1
            flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            following = 0 if last else indices[position + 1]
            self._next[index] = following
            self.memory.write(self.layout.desc_gpa + 16 * index, _DESC.pack(gpa, length, flags, following))
        head = indices[0]
        self._tokens[head] = (token, len(buffers))
        slot = self.layout.avail_gpa + 4 + 2 * (self.avail_idx % self.size)
        self.memory.write_u16(slot, head)
        # The index is published last: the device reads entries only below it.
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_u16(self.layout.avail_gpa + 2, self.avail_idx)
        return True

    def used_idx(self) -> int:
        return self.memory.read_u16(self.layout.used_gpa + 2)

    def has_used(self) -> bool:
        return self.used_idx() != self.last_used_idx

    def collect_used(self) -> list[tuple[object, int]]:
        done = []
        used_idx = self.used_idx()
        while self.last_used_idx != used_idx:
            slot = self.layout.used_gpa + 4 + 8 * (self.last_used_idx % self.size)
            head, length = _USED_ELEM.unpack(self.memory.read(slot, 8))
            entry = self._tokens.pop(head, None)
            if entry is None:
                raise RuntimeError(f"device completed descriptor {head}, which is not in flight")
            token, chain_length = entry
            index = head
            for _ in range(chain_length):
                self._free_descs.append(index)
                index = self._next[index]
            done.append((token, length))
            self.last_used_idx = (self.last_used_idx + 1) & 0xFFFF
        # used_event (after the avail ring): interrupt us on the very next entry.
        self.memory.write_u16(self.layout.avail_gpa + 4 + 2 * self.size, self.last_used_idx)
        return done
