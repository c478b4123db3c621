"""The guest side of a split virtqueue, written by hand for the virtqueue tests.

No tests live here. ``GuestRam`` is one memfd split into regions the way QEMU
describes it (gpa, size, fd offset, uva); ``Driver`` lays rings in it and plays
the virtio driver: writes descriptors, publishes avail entries, reads used ones.
It writes through its own mapping of the memfd, so what the back-end sees is
what a guest would have written.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

from vhostnet.virtqueue import GuestMemory

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1
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


class GuestRam:
    def __init__(self, layout: tuple[Layout, ...] = PC_LAYOUT, ram_bytes: int = RAM_BYTES):
        self.layout = layout
        self.fd = os.memfd_create("test-guest-ram")
        os.ftruncate(self.fd, ram_bytes)
        self.map = mmap.mmap(self.fd, ram_bytes, flags=mmap.MAP_SHARED)
        self.memory = GuestMemory()
        for region in layout:
            self.memory.add_region(region.gpa, region.size, region.uva, region.offset, self.fd)

    def close(self) -> None:
        self.memory.close()
        self.map.close()
        os.close(self.fd)

    def _offset(self, gpa: int, length: int) -> int:
        for region in self.layout:
            if region.gpa <= gpa and gpa + length <= region.gpa + region.size:
                return region.offset + gpa - region.gpa
        raise ValueError(f"test bug: gpa {gpa:#x}+{length} is not in one region")

    def uva(self, gpa: int) -> int:
        for region in self.layout:
            if region.gpa <= gpa < region.gpa + region.size:
                return region.uva + gpa - region.gpa
        raise ValueError(f"test bug: gpa {gpa:#x} unmapped")

    def write(self, gpa: int, data: bytes) -> None:
        # Byte by byte through the layout so writes may straddle adjacent regions.
        while data:
            region = next(r for r in self.layout if r.gpa <= gpa < r.gpa + r.size)
            piece = min(len(data), region.gpa + region.size - gpa)
            start = region.offset + gpa - region.gpa
            self.map[start : start + piece] = data[:piece]
            gpa += piece
            data = data[piece:]

    def read(self, gpa: int, length: int) -> bytes:
        out = b""
        while length:
            region = next(r for r in self.layout if r.gpa <= gpa < r.gpa + r.size)
            piece = min(length, region.gpa + region.size - gpa)
            start = region.offset + gpa - region.gpa
            out += self.map[start : start + piece]
            gpa += piece
            length -= piece
        return out

    def snapshot(self) -> bytes:
        return bytes(self.map)


class Driver:
    """The guest driver of one split ring of ``size`` entries."""

    def __init__(
        self, ram: GuestRam, size: int = 16, ring_gpa: int = 0x10000, buffer_gpa: int = 0x40000
    ):
        self.ram = ram
        self.size = size
        self.desc_gpa = ring_gpa
        self.avail_gpa = ring_gpa + 16 * size
        # The used ring starts on its own page, as Linux lays out a split ring.
        self.used_gpa = (self.avail_gpa + 6 + 2 * size + 0xFFF) & ~0xFFF
        self.next_buffer = buffer_gpa
        self.next_desc = 0
        self.avail_idx = 0
        self.used_seen = 0
        ram.write(self.desc_gpa, bytes(16 * size))
        ram.write(self.avail_gpa, bytes(6 + 2 * size))
        ram.write(self.used_gpa, bytes(6 + 8 * size))

    @property
    def ring_uvas(self) -> tuple[int, int, int]:
        return (
            self.ram.uva(self.desc_gpa),
            self.ram.uva(self.avail_gpa),
            self.ram.uva(self.used_gpa),
        )

    def alloc(self, length: int, fill: bytes = b"") -> int:
        gpa = self.next_buffer
        self.next_buffer += (length + 63) & ~63
        if fill:
            self.ram.write(gpa, fill)
        return gpa

    def write_desc(
        self,
        index: int,
        addr: int,
        length: int,
        flags: int,
        next_index: int = 0,
        table_gpa: int | None = None,
    ) -> None:
        base = self.desc_gpa if table_gpa is None else table_gpa
        self.ram.write(base + 16 * index, struct.pack("<QIHH", addr, length, flags, next_index))

    def add_chain(self, parts: list[tuple[int, int, int]]) -> int:
        """Write ``(addr, len, flags)`` parts as a linked chain of fresh descriptors; return head."""
        indices = [(self.next_desc + i) % self.size for i in range(len(parts))]
        self.next_desc = (self.next_desc + len(parts)) % self.size
        for position, (addr, length, flags) in enumerate(parts):
            last = position == len(parts) - 1
            self.write_desc(
                indices[position],
                addr,
                length,
                flags | (0 if last else DESC_F_NEXT),
                0 if last else indices[position + 1],
            )
        return indices[0]

    def add_indirect(self, parts: list[tuple[int, int, int]]) -> int:
        """An indirect table holding ``parts`` (linked in order), referenced by one descriptor."""
        table = self.alloc(16 * len(parts))
        for position, (addr, length, flags) in enumerate(parts):
            last = position == len(parts) - 1
            self.write_desc(
                position,
                addr,
                length,
                flags | (0 if last else DESC_F_NEXT),
                0 if last else position + 1,
                table_gpa=table,
            )
        return self.add_chain([(table, 16 * len(parts), DESC_F_INDIRECT)])

    def publish(self, *heads: int) -> None:
        for head in heads:
            slot = self.avail_idx % self.size
            self.ram.write(self.avail_gpa + 4 + 2 * slot, struct.pack("<H", head))
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.ram.write(self.avail_gpa + 2, struct.pack("<H", self.avail_idx))

    def set_avail_idx(self, value: int) -> None:
        self.ram.write(self.avail_gpa + 2, struct.pack("<H", value & 0xFFFF))

    def set_avail_flags(self, flags: int) -> None:
        self.ram.write(self.avail_gpa, struct.pack("<H", flags))

    def set_used_event(self, value: int) -> None:
        self.ram.write(self.avail_gpa + 4 + 2 * self.size, struct.pack("<H", value & 0xFFFF))

    def used_idx(self) -> int:
        return struct.unpack("<H", self.ram.read(self.used_gpa + 2, 2))[0]

    def used_flags(self) -> int:
        return struct.unpack("<H", self.ram.read(self.used_gpa, 2))[0]

    def avail_event(self) -> int:
        return struct.unpack("<H", self.ram.read(self.used_gpa + 4 + 8 * self.size, 2))[0]

    def take_used(self) -> list[tuple[int, int]]:
        """New used entries as (head, length) since the last call."""
        entries = []
        end = self.used_idx()
        while self.used_seen != end:
            slot = self.used_seen % self.size
            entries.append(struct.unpack("<II", self.ram.read(self.used_gpa + 4 + 8 * slot, 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return entries


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
