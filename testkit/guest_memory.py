"""Guest RAM for the test front-end, the benchmark guest and the kernel tests.

``GuestMemoryImage`` is a memfd mapped into this process and described as
guest RAM regions the way QEMU describes them (gpa, size, front-end virtual
address, fd offset). By default it is laid out like a small QEMU pc guest: two
regions with a hole between them, each with its own (made-up) front-end
virtual address, so that a back-end that confuses guest-physical and
front-end virtual addresses fails loudly. ``SlotAllocator`` hands out
fixed-size buffers from several guest-physical ranges.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Sequence

import numpy as np

from vhostnet.vhost_user.codec import MemoryRegion

_U16 = struct.Struct("<H")

# QEMU's pc layout below 4 GiB: low RAM, then the VGA/ROM hole, then the rest.
LOW_RAM_END = 0xA0000
HIGH_RAM_START = 0xC0000
# Made-up front-end virtual addresses, deliberately unrelated to each other
# and to the guest-physical addresses.
LOW_RAM_UVA = 0x7F3A_0000_0000
HIGH_RAM_UVA = 0x7F5C_0004_0000

MIN_MEMORY_SIZE = 16 << 20


class GuestAddressError(ValueError):
    """A guest-physical range that is not guest RAM."""


def pc_regions(size: int) -> tuple[MemoryRegion, ...]:
    """QEMU's pc machine below 4 GiB over ``size`` bytes of memfd (gpa == fd offset)."""
    return (
        MemoryRegion(0, LOW_RAM_END, LOW_RAM_UVA, 0),
        MemoryRegion(HIGH_RAM_START, size - HIGH_RAM_START, HIGH_RAM_UVA, HIGH_RAM_START),
    )


def _contains(region: MemoryRegion, gpa: int, length: int) -> bool:
    start = region.guest_phys_addr
    return start <= gpa and gpa + length <= start + region.memory_size


class GuestMemoryImage:
    """A memfd mapped into this process, presented as guest RAM regions.

    ``regions`` defaults to the pc layout (and then ``size`` must be at least
    ``MIN_MEMORY_SIZE``). Reads and writes may run across regions that are
    adjacent in guest-physical space, as a guest buffer may.
    """

    def __init__(
        self,
        size: int,
        regions: Sequence[MemoryRegion] | None = None,
        name: str = "vhostnet-guest",
    ) -> None:
        if regions is None:
            if size < MIN_MEMORY_SIZE:
                raise ValueError(f"guest memory must be at least {MIN_MEMORY_SIZE} bytes")
            regions = pc_regions(size)
        self.size = size
        self.regions = tuple(regions)
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def memory_regions(self) -> list[MemoryRegion]:
        return list(self.regions)

    def _region(self, gpa: int, length: int) -> MemoryRegion:
        for region in self.regions:
            if _contains(region, gpa, length):
                return region
        raise GuestAddressError(f"gpa {gpa:#x}+{length} is not inside one region")

    def offset(self, gpa: int, length: int) -> int:
        """The memfd offset of a guest-physical range inside one region."""
        region = self._region(gpa, length)
        return region.mmap_offset + gpa - region.guest_phys_addr

    def uva(self, gpa: int) -> int:
        """The front-end virtual address of a guest-physical address (for ring addresses)."""
        region = self._region(gpa, 1)
        return region.userspace_addr + gpa - region.guest_phys_addr

    def view(self, gpa: int, length: int) -> np.ndarray:
        """A writable uint8 numpy view of a range inside one region.

        The view pins the mapping; ``close()`` leaves the unmap to the last view.
        """
        offset = self.offset(gpa, length)
        return np.frombuffer(self.map, dtype=np.uint8, count=length, offset=offset)

    def _pieces(self, gpa: int, length: int) -> list[tuple[int, int]]:
        """(fd offset, length) pieces of a range, region by region."""
        pieces = []
        while length:
            region = self._region(gpa, 1)
            piece = min(length, region.guest_phys_addr + region.memory_size - gpa)
            pieces.append((region.mmap_offset + gpa - region.guest_phys_addr, piece))
            gpa += piece
            length -= piece
        return pieces

    def read(self, gpa: int, length: int) -> bytes:
        return b"".join(self.map[start : start + piece] for start, piece in self._pieces(gpa, length))

    def write(self, gpa: int, data: bytes) -> None:
        done = 0
        for start, piece in self._pieces(gpa, len(data)):
            self.map[start : start + piece] = data[done : done + piece]
            done += piece

    def read_u16(self, gpa: int) -> int:
        return _U16.unpack_from(self.map, self.offset(gpa, 2))[0]

    def write_u16(self, gpa: int, value: int) -> None:
        _U16.pack_into(self.map, self.offset(gpa, 2), value & 0xFFFF)

    def snapshot(self) -> bytes:
        """The whole memfd, guest RAM and holes alike."""
        return bytes(self.map)

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:
            pass  # numpy views (rings) still use it: it is unmapped with the last one
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
