"""Guest RAM and a ring driver for the virtqueue kernel tests.

No tests live here. ``GuestRam`` is the test kit's memfd guest memory split
into regions the way QEMU describes them (gpa, size, fd offset, uva), plus the
back-end's ``GuestMemory`` over the same fd. ``Driver`` is the test kit's
``SplitRing`` with its rings laid out as Linux lays them out and a bump
allocator for buffers (``PackedDriver``: the same over ``PackedRing``); it writes through this process's mapping of the memfd,
so what the kernel sees is what a guest would have written.
"""

from __future__ import annotations

from dataclasses import dataclass

from testkit.guest_memory import GuestMemoryImage
from testkit.guest_ring import VIRTQ_AVAIL_F_NO_INTERRUPT as AVAIL_F_NO_INTERRUPT
from testkit.guest_ring import VIRTQ_DESC_F_INDIRECT as DESC_F_INDIRECT
from testkit.guest_ring import VIRTQ_DESC_F_NEXT as DESC_F_NEXT
from testkit.guest_ring import VIRTQ_DESC_F_WRITE as DESC_F_WRITE
from testkit.guest_ring import VIRTQ_USED_F_NO_NOTIFY as USED_F_NO_NOTIFY
from testkit.guest_ring import RingLayout, SplitRing, pack_desc
from testkit.packed_ring import PackedRing
from vhostnet.vhost_user.codec import MemoryRegion
from vhostnet.virtqueue import GuestMemory

__all__ = [
    "AVAIL_F_NO_INTERRUPT",
    "DESC_F_INDIRECT",
    "DESC_F_NEXT",
    "DESC_F_WRITE",
    "USED_F_NO_NOTIFY",
    "Driver",
    "GuestRam",
    "PackedDriver",
    "pack_desc",
]

UVA_BASE = 0x7F12_3400_0000
HDR_LEN = 12


@dataclass(frozen=True)
class Layout:
    gpa: int
    size: int
    offset: int  # in the memfd

    @property
    def uva(self) -> int:
        # QEMU maps the whole memfd once, so uva = base + fd offset.
        return UVA_BASE + self.offset


# QEMU's pc layout: low RAM, the VGA/ROM hole, then the rest (here 2 MiB of RAM).
PC_LAYOUT = (Layout(0x0, 0xA0000, 0x0), Layout(0xC0000, 0x140000, 0xC0000))
# Two regions contiguous in gpa but not in the fd, for buffers that cross a boundary.
SPLIT_LAYOUT = (Layout(0x0, 0x100000, 0x100000), Layout(0x100000, 0x100000, 0x0))
RAM_BYTES = 0x200000
# One page of the fd that no region maps: the kernel must never write there.
UNMAPPED_FD_OFFSET = 0xA0000


class GuestRam(GuestMemoryImage):
    """Guest memory as the test's guest writes it and as the kernel maps it (``memory``)."""

    def __init__(self, layout: tuple[Layout, ...] = PC_LAYOUT, ram_bytes: int = RAM_BYTES):
        regions = [MemoryRegion(r.gpa, r.size, r.uva, r.offset) for r in layout]
        super().__init__(ram_bytes, regions, name="test-guest-ram")
        self.layout = layout
        self.memory = GuestMemory()
        for region in layout:
            self.memory.add_region(region.gpa, region.size, region.uva, region.offset, self.fd)

    def close(self) -> None:
        self.memory.close()
        super().close()


class BufferAllocator:
    """A bump allocator for a driver's buffers and indirect tables (mixed into the drivers)."""

    ram: GuestRam
    next_buffer: int

    def alloc(self, length: int, fill: bytes = b"") -> int:
        gpa = self.next_buffer
        self.next_buffer += (length + 63) & ~63
        if fill:
            self.ram.write(gpa, fill)
        return gpa

    def add_indirect(self, parts: list[tuple[int, int, int]]) -> int:
        """An indirect table holding ``parts`` (in order), referenced by one descriptor."""
        table = self.alloc(16 * len(parts))
        self.write_indirect(table, parts)  # type: ignore[attr-defined]
        return self.add_chain([(table, 16 * len(parts), DESC_F_INDIRECT)])  # type: ignore[attr-defined]


class Driver(BufferAllocator, SplitRing):
    """The guest driver of one split ring of ``size`` entries, buffers from ``buffer_gpa`` up."""

    def __init__(
        self, ram: GuestRam, size: int = 16, ring_gpa: int = 0x10000, buffer_gpa: int = 0x40000
    ):
        # The used ring starts on its own page, as Linux lays out a split ring.
        super().__init__(ram, RingLayout.at(ring_gpa, size, used_align=0x1000))
        self.ram = ram
        self.next_buffer = buffer_gpa


class PackedDriver(BufferAllocator, PackedRing):
    """The guest driver of one packed ring of ``size`` descriptors, buffers from ``buffer_gpa`` up."""

    def __init__(
        self, ram: GuestRam, size: int = 16, ring_gpa: int = 0x10000, buffer_gpa: int = 0x40000
    ):
        super().__init__(ram, RingLayout.packed_at(ring_gpa, size))
        self.ram = ram
        self.next_buffer = buffer_gpa


def tx_parts(driver: Driver, frame: bytes, cuts: list[int]) -> list[tuple[int, int, int]]:
    """Header + frame cut at the given byte positions into readable buffers."""
    data = bytes(HDR_LEN) + frame
    bounds = [0, *cuts, len(data)]
    parts = []
    for start, end in zip(bounds, bounds[1:], strict=False):
        piece = data[start:end]
        parts.append((driver.alloc(len(piece), piece), len(piece), 0))
    return parts


def ethernet_frame(length: int, seed: int = 1) -> bytes:
    """A recognisable frame: broadcast destination, a fixed source, then a byte pattern."""
    body = bytes((seed + i) & 0xFF for i in range(length - 14))
    return b"\xff" * 6 + b"\x52\x54\x00\x12\x34\x56" + b"\x08\x00" + body
