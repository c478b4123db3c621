"""Fuzz target for the split-ring kernel (ext/virtq.pyx) through ``Virtqueue``.

The fuzz bytes lay out one ring in guest memory (a memfd in two regions with a hole
between them and a page of the file no region maps): the descriptor table, the avail
ring and the used ring, then buffer contents. Descriptor addresses and lengths are
either kept raw (hostile) or folded into the guest's address space, so both kinds of
chain are tried. Then the kernel drains TX, pushes RX frames, notifies, and toggles
kicks. The contract: nothing raises and the kernel's counters only grow. Memory
outside the regions is never touched: the AddressSanitizer build (``make test-asan``)
checks that; here a stray write would show as a crash or a changed guard page.
"""

from __future__ import annotations

import os
import struct

from testkit.guest_memory import GuestMemoryImage
from testkit.guest_ring import RingLayout
from vhostnet.vhost_user.codec import MemoryRegion
from vhostnet.vhost_user.protocol import VirtioFeature
from vhostnet.virtqueue import AddressError, FrameBatch, GuestMemory, Virtqueue

MEMFD_BYTES = 0x40000
# Region A: gpa 0..128 KiB at fd 0; region B: gpa 160..224 KiB at fd 192 KiB.
# Guest-physical 128..160 KiB is a hole; fd 128..192 KiB is mapped by no region.
REGIONS = (
    MemoryRegion(0x0, 0x20000, 0x7F00_1000_0000, 0x0),
    MemoryRegion(0x28000, 0x10000, 0x7F00_2000_0000, 0x30000),
)
GUARD = slice(0x20000, 0x30000)  # the unmapped part of the file: must stay zero
_GUARD_ZEROS = bytes(GUARD.stop - GUARD.start)
RING_GPA = 0x1000
BUFFER_GPA = 0x8000
FOLD_SPAN = 0x40000  # folded addresses land in 0..256 KiB: regions, hole, beyond
FOLD_LEN = 0x4000
OFFLOADS = (VirtioFeature.NET_F_CSUM | VirtioFeature.NET_F_GUEST_CSUM
            | VirtioFeature.NET_F_HOST_TSO4 | VirtioFeature.NET_F_GUEST_TSO4
            | VirtioFeature.VERSION_1)
_HEADER = struct.Struct("<BBH")
_DESC = struct.Struct("<QIHH")
RX_FRAME = bytes.fromhex("525400123456" "525600000002" "0800") + bytes(range(50))


def _fold_descriptors(raw: bytes) -> bytes:
    """Descriptors with small-looking addresses/lengths folded into guest memory's range."""
    out = bytearray()
    for offset in range(0, len(raw) - len(raw) % 16, 16):
        addr, length, flags, following = _DESC.unpack_from(raw, offset)
        if addr >> 56 == 0:
            addr %= FOLD_SPAN
        if length >> 28 == 0:
            length %= FOLD_LEN
        out += _DESC.pack(addr, length, flags, following)
    return bytes(out) + raw[len(raw) - len(raw) % 16:]


class RingTarget:
    def __init__(self) -> None:
        self.image = GuestMemoryImage(MEMFD_BYTES, REGIONS, name="vhostnet-fuzz-ring")
        self.memory = GuestMemory()
        for region in REGIONS:
            self.memory.add_region(region.guest_phys_addr, region.memory_size,
                                   region.userspace_addr, region.mmap_offset, self.image.fd)
        self.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.tx = FrameBatch(64, 64 * 65562)
        self.rx = FrameBatch(16, 16 * 2048)

    def __call__(self, data: bytes) -> None:
        if len(data) < _HEADER.size:
            return
        shape, options, base = _HEADER.unpack_from(data)
        size = 1 << (shape % 9)
        layout = RingLayout.at(RING_GPA, size)
        ring_bytes = layout.end - RING_GPA
        body = data[_HEADER.size:]
        rings = _fold_descriptors(body[: 16 * size]) + body[16 * size: ring_bytes]
        image = self.image
        image.map[: GUARD.start] = bytes(GUARD.start)
        image.write(RING_GPA, rings)
        image.write(BUFFER_GPA, body[ring_bytes: ring_bytes + 0x8000])
        try:
            queue = Virtqueue(
                self.memory, size, image.uva(layout.desc_gpa), image.uva(layout.avail_gpa),
                image.uva(layout.used_gpa), base=base, hdr_len=10 if options & 4 else 12,
                mrg_rxbuf=bool(options & 1), event_idx=bool(options & 2), call_fd=self.call_fd,
                features=OFFLOADS if options & 8 else VirtioFeature.VERSION_1, name="fuzz")
        except (AddressError, ValueError):
            return
        counts = queue.counters()
        for _ in range(2):
            self.tx.clear()
            queue.tx_drain(self.tx, 64)
            counts = _grown(counts, queue.counters())
        self.rx.clear()
        for _ in range(options >> 4):
            self.rx.append(RX_FRAME)
        queue.rx_push(self.rx)
        counts = _grown(counts, queue.counters())
        queue.notify()
        if queue.enable_kick():
            self.tx.clear()
            queue.tx_drain(self.tx, 64)
        queue.disable_kick()
        _grown(counts, queue.counters())
        assert image.map[GUARD] == _GUARD_ZEROS, "the kernel wrote to file pages no region maps"
        try:
            os.eventfd_read(self.call_fd)
        except BlockingIOError:
            pass


def _grown(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    for name, value in before.items():
        assert after.get(name, 0) >= value, f"counter {name} went back: {value} -> {after.get(name)}"
    return after
