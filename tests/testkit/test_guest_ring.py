"""The test kit's guest memory and its one split-ring driver, against a device played by hand."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from testkit.guest_memory import MIN_MEMORY_SIZE, GuestAddressError, GuestMemoryImage
from testkit.guest_ring import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    RingLayout,
    SplitRing,
    need_event,
    pack_desc,
)
from testkit.packed_ring import EVENT_FLAG_DESC, EVENT_FLAG_DISABLE, EVENT_FLAG_ENABLE, PackedRing
from vhostnet.vhost_user.codec import MemoryRegion

UVA = 0x7F00_0000_0000
# Two regions adjacent in gpa but swapped in the fd, and a hole above them.
REGIONS = (MemoryRegion(0, 0x10000, UVA, 0x10000), MemoryRegion(0x10000, 0x10000, UVA + 0x40000, 0))


@pytest.fixture
def memory():
    image = GuestMemoryImage(0x20000, REGIONS, name="test-guest-ring")
    yield image
    image.close()


def device_uses(ring: SplitRing, *entries: tuple[int, int]) -> None:
    """Play the device: append (head, length) used entries and store used idx."""
    idx = ring.used_idx()
    for head, length in entries:
        ring.used_ring[idx % ring.size] = (head, length)
        idx += 1
    ring.used_head[1] = idx & 0xFFFF


def test_need_event_matches_virtio_definition() -> None:
    assert need_event(event=5, new=6, old=5)
    assert not need_event(event=9, new=6, old=5)
    assert need_event(event=0xFFFF, new=2, old=0xFFFE)  # across the 16-bit wrap


def test_layout_aligns_the_used_ring() -> None:
    assert RingLayout.at(0x1000, 16) == RingLayout(16, 0x1000, 0x1100, 0x1128)
    linux = RingLayout.at(0x1000, 16, used_align=0x1000)
    assert linux.used_gpa == 0x2000 and linux.end == 0x2000 + 6 + 8 * 16


def test_memory_reads_and_writes_across_adjacent_regions(memory) -> None:
    memory.write(0xFFFE, b"abcd")
    assert memory.read(0xFFFE, 4) == b"abcd"
    # gpa 0xFFFE is fd offset 0x1FFFE, gpa 0x10000 is fd offset 0.
    assert memory.map[0x1FFFE:0x20000] == b"ab" and memory.map[0:2] == b"cd"
    assert memory.offset(0x10004, 4) == 4 and memory.uva(0x10004) == UVA + 0x40004
    with pytest.raises(GuestAddressError):
        memory.offset(0xFFFE, 4)  # not inside one region
    with pytest.raises(GuestAddressError):
        memory.read(0x20000, 1)  # not guest RAM


def test_memory_view_is_live_and_close_outlives_it() -> None:
    image = GuestMemoryImage(0x20000, REGIONS)
    view = image.view(0x10010, 4)
    view[:] = np.frombuffer(b"wxyz", dtype=np.uint8)
    assert image.read(0x10010, 4) == b"wxyz" and image.snapshot()[0x10:0x14] == b"wxyz"
    image.close()  # the mapping stays until the view goes
    assert bytes(view) == b"wxyz"


def test_pc_layout_needs_enough_memory() -> None:
    with pytest.raises(ValueError):
        GuestMemoryImage(MIN_MEMORY_SIZE - 1)


def test_hand_written_chains_publish_and_used_entries(memory) -> None:
    ring = SplitRing(memory, RingLayout.at(0x100, 4))
    head = ring.add_chain([(0x4000, 10, 0), (0x5000, 20, VIRTQ_DESC_F_WRITE)])
    assert head == 0 and ring.next_desc == 2
    assert memory.read(0x100, 32) == (pack_desc(0x4000, 10, VIRTQ_DESC_F_NEXT, 1)
                                      + pack_desc(0x5000, 20, VIRTQ_DESC_F_WRITE, 0))
    ring.publish(head)
    assert struct.unpack("<HHH", memory.read(ring.avail_gpa, 6)) == (0, 1, 0)
    assert ring.in_flight == 1 and ring.take_used() == []
    device_uses(ring, (0, 20))
    assert ring.has_used() and ring.take_used() == [(0, 20)] and ring.in_flight == 0
    ring.write_indirect(0x6000, [(0x7000, 5, 0), (0x8000, 6, 0)])
    assert memory.read(0x6000, 16) == pack_desc(0x7000, 5, VIRTQ_DESC_F_NEXT, 1)
    ring.set_used_event(7)
    ring.set_avail_flags(1)
    ring.set_avail_idx(9)
    assert struct.unpack("<HH", memory.read(ring.avail_gpa, 4)) == (1, 9) and ring.avail_idx == 1
    assert memory.read(ring.avail_gpa + 4 + 2 * 4, 2) == b"\x07\x00"


def test_tracked_chains_come_back_with_their_tokens(memory) -> None:
    ring = SplitRing(memory, RingLayout.at(0x100, 4))
    ring.start_at(0xFFFF)
    assert memory.read(ring.avail_gpa + 2, 2) == memory.read(ring.used_gpa + 2, 2) == b"\xff\xff"
    assert ring.queue_chain([(0x4000, 8, 0), (0x5000, 8, 0), (0x6000, 8, 0)], "a")
    assert not ring.queue_chain([(0x4000, 8, 0), (0x5000, 8, 0)], "b")  # one descriptor left
    assert ring.queue_chain([(0x7000, 8, VIRTQ_DESC_F_WRITE)], "c")
    assert ring.free_descriptors == 0 and ring.avail_idx == 1
    device_uses(ring, (3, 8), (0, 0))
    assert ring.collect_used() == [("c", 8), ("a", 0)]
    assert ring.free_descriptors == 4 and ring.in_flight == 0
    assert memory.read(ring.avail_gpa + 4 + 2 * 4, 2) == b"\x01\x00"  # used_event: the next one
    device_uses(ring, (2, 0))
    with pytest.raises(RuntimeError):
        ring.collect_used()


def test_fixed_buffers_kick_only_when_the_device_asks(memory) -> None:
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    call = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        ring = SplitRing(memory, RingLayout.at(0x100, 4), kick_fd=kick, call_fd=call)
        ring.attach_buffers(0x10000, 0x100, writable=True)
        assert ring.buffers is not None and ring.buffers.shape == (4, 0x100)
        assert list(ring.desc["addr"]) == [0x10000, 0x10100, 0x10200, 0x10300]
        assert list(ring.avail[2:6]) == [0, 1, 2, 3] and ring.slot(5) == 1
        ring.expose(2)  # avail_event 0: the device wants to hear about entry 0
        assert ring.kicks == 1 and os.eventfd_read(kick) == 1
        memory.write(ring.used_gpa + 4 + 8 * 4, b"\x05\x00")  # avail_event: entry 5
        assert ring.avail_event() == 5
        ring.expose(1)
        assert ring.kicks == 1 and ring.free == 1
        device_uses(ring, (0, 60), (1, 70), (2, 80))
        assert ring.wait(0.0)  # progress before sleeping returns at once
        start, count = ring.consume_used()
        assert (start, count) == (0, 3) and list(ring.used_lengths(start, count)) == [60, 70, 80]
        ring.check_in_order(start, count)
        assert not ring.wait(0.01)
        assert memory.read(ring.avail_gpa + 4 + 2 * 4, 2) == (3 + 0x7FFF).to_bytes(2, "little")
        device_uses(ring, (3, 1), (2, 1))  # position 4 is descriptor 0, not 2
        with pytest.raises(RuntimeError):
            ring.check_in_order(*ring.consume_used())
    finally:
        os.close(kick)
        os.close(call)


def test_without_event_idx_the_driver_kicks_by_the_used_flags_and_asks_by_avail_flags(
        memory) -> None:
    """A device that did not negotiate EVENT_IDX writes no avail_event (passt does not): the
    driver kicks on every publish unless the device set VIRTQ_USED_F_NO_NOTIFY, and turns
    interrupts on and off with VIRTQ_AVAIL_F_NO_INTERRUPT, as Linux's virtio_ring does."""
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        ring = SplitRing(memory, RingLayout.at(0x100, 4), kick_fd=kick, event_idx=False)
        ring.attach_buffers(0x10000, 0x100, writable=False)
        assert struct.unpack("<H", memory.read(ring.avail_gpa, 2)) == (VIRTQ_AVAIL_F_NO_INTERRUPT,)
        ring.expose(1)
        ring.expose(1)  # avail_event stays 0: with EVENT_IDX this one would not kick
        assert ring.kicks == 2 and os.eventfd_read(kick) == 2
        ring.used_head[0] = VIRTQ_USED_F_NO_NOTIFY
        ring.expose(1)
        assert ring.kicks == 2
        ring.used_head[0] = 0
        ring.expose(1)
        assert ring.kicks == 3
        used_event = memory.read(ring.avail_gpa + 4 + 2 * 4, 2)
        ring.arm(2)
        assert struct.unpack("<H", memory.read(ring.avail_gpa, 2)) == (0,)
        assert memory.read(ring.avail_gpa + 4 + 2 * 4, 2) == used_event  # not an event index
        ring.quiet()
        assert struct.unpack("<H", memory.read(ring.avail_gpa, 2)) == (VIRTQ_AVAIL_F_NO_INTERRUPT,)
    finally:
        os.close(kick)


def test_a_packed_ring_without_event_idx_asks_for_interrupts_without_the_desc_mode(
        memory) -> None:
    ring = PackedRing(memory, RingLayout.packed_at(0x100, 4), event_idx=False)
    ring.arm(3)
    assert struct.unpack("<HH", memory.read(ring.avail_gpa, 4)) == (0, EVENT_FLAG_ENABLE)
    ring.quiet()
    assert struct.unpack("<HH", memory.read(ring.avail_gpa, 4)) == (0, EVENT_FLAG_DISABLE)
    with_event_idx = PackedRing(memory, RingLayout.packed_at(0x200, 4))
    with_event_idx.arm(3)
    assert struct.unpack("<HH", memory.read(0x200 + 64, 4)) == (3 | 1 << 15, EVENT_FLAG_DESC)
