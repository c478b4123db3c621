"""The packed-ring kernel (PackedQueue through ``Virtqueue``): normal paths and hostile guests.

The guest side is the test kit's ``PackedRing`` (``PackedDriver``); ``Virtqueue`` picks
the packed kernel because the features carry VIRTIO_F_RING_PACKED. Hostile cases
mirror test_virtqueue_hostile.py: each bad chain is counted and completed empty and
the next good one still goes through; a chain the ring cannot delimit stops the queue.
"""

from __future__ import annotations

import os
import struct

import pytest

from testkit.packed_ring import (
    EVENT_FLAG_DESC,
    EVENT_FLAG_DISABLE,
    EVENT_FLAG_ENABLE,
    FRESH_BASE,
    PACKED_DESC_F_AVAIL,
    PACKED_DESC_F_USED,
)
from tests.support.guest_ram import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    HDR_LEN,
    GuestRam,
    PackedDriver,
    ethernet_frame,
    tx_parts,
)
from vhostnet.virtqueue import VIRTIO_F_RING_PACKED, FrameBatch, Virtqueue

HOLE_GPA = 0xA0000  # the VGA/ROM hole of the pc layout: not guest RAM


@pytest.fixture
def ram():
    guest = GuestRam()
    yield guest
    guest.close()


def make_queue(ram: GuestRam, driver: PackedDriver, base: int = FRESH_BASE, **options) -> Virtqueue:
    return Virtqueue(ram.memory, driver.size, *driver.ring_uvas, base=base,
                     features=VIRTIO_F_RING_PACKED, **options)


def read_call(fd: int) -> int | None:
    try:
        return struct.unpack("<Q", os.read(fd, 8))[0]
    except BlockingIOError:
        return None


def post_rx(driver: PackedDriver, sizes: list[int]) -> list[tuple[int, int]]:
    chains = []
    for size in sizes:
        gpa = driver.alloc(size)
        chains.append((driver.add_chain([(gpa, size, DESC_F_WRITE)]), gpa))
    driver.publish(*(head for head, _ in chains))
    return chains


# ------------------------------------------------------------------------ TX


def test_tx_chains_direct_and_indirect(ram):
    driver = PackedDriver(ram)
    queue = make_queue(ram, driver)
    assert queue.packed
    frames = [ethernet_frame(300, seed=s) for s in range(3)]
    heads = [driver.add_chain(tx_parts(driver, frames[0], [])),
             driver.add_chain(tx_parts(driver, frames[1], [5, 9, 40])),
             driver.add_indirect(tx_parts(driver, frames[2], [12, 50]))]
    driver.publish(*heads)
    batch = FrameBatch(8, 1 << 20)
    assert queue.tx_drain(batch, 8) == 3
    assert [bytes(batch.frame(i)) for i in range(3)] == frames
    # One used descriptor per chain, where the chain started, with its buffer id.
    assert driver.take_used() == [(heads[0], 0), (heads[1], 0), (heads[2], 0)]
    assert heads == [0, 1, 5]
    assert queue.base == driver.base == (6 | 0x8000) * 0x10001


def test_tx_wraps_around_the_ring_many_times(ram):
    driver = PackedDriver(ram, size=8)
    queue = make_queue(ram, driver)
    batch = FrameBatch(8, 1 << 20)
    for lap in range(40):  # chains of 1..3 descriptors: the wrap flips at odd places
        frame = ethernet_frame(100 + lap, seed=lap)
        cuts = [4, 20][: lap % 3]
        driver.publish(driver.add_chain(tx_parts(driver, frame, cuts)))
        batch.clear()
        assert queue.tx_drain(batch, 8) == 1
        assert bytes(batch.frame(0)) == frame
        assert len(driver.take_used()) == 1
        driver.next_buffer = 0x40000
    assert queue.base == driver.base
    assert queue.counters()["tx_frames"] == 40


def test_tx_restarts_from_a_packed_base(ram):
    driver = PackedDriver(ram, size=8)
    base = 5 | 0x0000 | (5 << 16)  # slot 5, wrap counter 0: the second lap
    driver.start_at(base)
    queue = make_queue(ram, driver, base=base)
    frame = ethernet_frame(100)
    driver.publish(driver.add_chain(tx_parts(driver, frame, [20])))
    batch = FrameBatch(8, 1 << 20)
    assert queue.tx_drain(batch, 8) == 1
    assert bytes(batch.frame(0)) == frame
    assert driver.take_used() == [(5, 0)]
    assert queue.base == 7 | 7 << 16


def test_a_base_outside_the_ring_is_refused(ram):
    driver = PackedDriver(ram, size=8)
    with pytest.raises(ValueError):
        make_queue(ram, driver, base=0x80008009)


# ------------------------------------------------------------------------ RX


def test_rx_without_and_with_mrg_rxbuf(ram):
    driver = PackedDriver(ram)
    queue = make_queue(ram, driver)
    (head, gpa), = post_rx(driver, [2000])
    batch = FrameBatch(8, 1 << 20)
    frame = ethernet_frame(1000, seed=4)
    batch.append(frame)
    assert queue.rx_push(batch) == 1
    assert driver.take_used() == [(head, HDR_LEN + 1000)]
    assert ram.read(gpa + HDR_LEN, 1000) == frame

    driver2 = PackedDriver(ram, ring_gpa=0x20000, buffer_gpa=0x60000)
    queue2 = make_queue(ram, driver2, mrg_rxbuf=True)
    chains = post_rx(driver2, [600, 600, 600])
    big = ethernet_frame(1500, seed=5)
    batch.clear()
    batch.append(big)
    assert queue2.rx_push(batch) == 1
    used = driver2.take_used()
    assert [length for _, length in used] == [600, 600, HDR_LEN + 1500 - 1200]
    data = b"".join(ram.read(gpa, length) for (_, gpa), (_, length) in zip(chains, used, strict=True))
    assert struct.unpack_from("<H", data, 10)[0] == 3  # num_buffers
    assert data[HDR_LEN:] == big


def test_rx_waits_for_buffers_and_kick_asks_for_new_ones(ram):
    driver = PackedDriver(ram)
    queue = make_queue(ram, driver, event_idx=True, mrg_rxbuf=True)
    post_rx(driver, [200])
    batch = FrameBatch(8, 1 << 20)
    batch.append(ethernet_frame(1000))
    assert queue.rx_push(batch) == 0  # 200 bytes are not enough: wait for more
    assert not queue.enable_kick()  # nothing new since
    off_wrap, flags = driver.device_event_state()
    assert flags == EVENT_FLAG_DESC and off_wrap == driver.position(1)
    post_rx(driver, [1000])
    assert queue.enable_kick()
    assert queue.rx_push(batch) == 1
    queue.disable_kick()
    assert driver.device_event_state()[1] == EVENT_FLAG_DISABLE


def test_kicks_without_event_idx(ram):
    driver = PackedDriver(ram)
    queue = make_queue(ram, driver)
    queue.disable_kick()
    assert driver.device_event_state()[1] == EVENT_FLAG_DISABLE
    assert not queue.enable_kick()
    assert driver.device_event_state()[1] == EVENT_FLAG_ENABLE


# ------------------------------------------------------------- notifications


@pytest.fixture
def call_fd():
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    yield fd
    os.close(fd)


def test_notify_follows_the_driver_event(ram, call_fd):
    driver = PackedDriver(ram)
    queue = make_queue(ram, driver, event_idx=True, call_fd=call_fd)
    batch = FrameBatch(8, 1 << 20)

    def send(count: int) -> bool:
        driver.publish(*(driver.add_chain(tx_parts(driver, ethernet_frame(60), []))
                         for _ in range(count)))
        batch.clear()
        queue.tx_drain(batch, 8)
        driver.take_used()
        return queue.notify()

    driver.set_driver_event(0, EVENT_FLAG_DISABLE)
    assert not send(2) and read_call(call_fd) is None
    driver.set_driver_event(0, EVENT_FLAG_ENABLE)
    assert send(1) and read_call(call_fd) == 1
    driver.set_driver_event(driver.position(5), EVENT_FLAG_DESC)  # at used slot 5
    assert not send(1)  # used 3 -> 4
    assert send(2)  # used 4 -> 6 passes 5
    driver.set_driver_event(driver.position(driver.used_seen + 1), EVENT_FLAG_DESC)
    assert not send(1)
    assert read_call(call_fd) == 1


# -------------------------------------------------------------------- hostile


def counters_after_tx(driver: PackedDriver, queue: Virtqueue, bad: list[list[tuple[int, int, int]]]):
    """Publish the bad chains and one good frame; the good one must still go through."""
    good = ethernet_frame(100, seed=9)
    heads = [driver.add_chain(parts) for parts in bad]
    heads.append(driver.add_chain(tx_parts(driver, good, [])))
    driver.publish(*heads)
    batch = FrameBatch(8, 1 << 20)
    assert queue.tx_drain(batch, 8) == 1
    assert bytes(batch.frame(0)) == good
    assert [length for _, length in driver.take_used()] == [0] * len(heads)
    return queue.counters()


@pytest.mark.parametrize(("parts", "reason"), [
    ([(HOLE_GPA, 200, 0)], "address_unmapped"),
    ([(0xFFFF_FFFF_FFFF_FF00, 0x200, 0)], "address_overflow"),
    ([(0x50000, 200, DESC_F_WRITE)], "wrong_direction"),
    ([(0x50000, 0, DESC_F_INDIRECT)], "indirect_bad_length"),
    ([(0x50000, 24, DESC_F_INDIRECT)], "indirect_bad_length"),
    ([(0x50000, 16, DESC_F_INDIRECT), (0x50000, 200, 0)], "indirect_with_next"),
    ([(HOLE_GPA, 32, DESC_F_INDIRECT)], "address_unmapped"),
])
def test_bad_tx_chains_are_counted_and_completed(ram, parts, reason):
    driver = PackedDriver(ram)
    queue = make_queue(ram, driver)
    counts = counters_after_tx(driver, queue, [parts])
    assert counts[reason] == 1 and not queue.broken


def test_indirect_tables_that_nest_or_point_outside_are_refused(ram):
    driver = PackedDriver(ram)
    queue = make_queue(ram, driver)
    nested = driver.alloc(32)
    driver.write_indirect(nested, [(0x50000, 100, 0), (nested, 32, DESC_F_INDIRECT)])
    outside = driver.alloc(16)
    driver.write_indirect(outside, [(HOLE_GPA, 100, 0)])
    counts = counters_after_tx(driver, queue, [[(nested, 32, DESC_F_INDIRECT)],
                                               [(outside, 16, DESC_F_INDIRECT)]])
    assert counts["indirect_nested"] == 1 and counts["address_unmapped"] == 1


def test_a_buffer_id_outside_the_ring_is_counted(ram):
    driver = PackedDriver(ram)
    queue = make_queue(ram, driver)
    frame = ethernet_frame(100)
    head = driver.add_chain(tx_parts(driver, frame, []), buffer_id=999)
    driver.publish(head)
    batch = FrameBatch(8, 1 << 20)
    assert queue.tx_drain(batch, 8) == 0
    assert driver.take_used() == [(999, 0)]
    assert queue.counters()["head_out_of_range"] == 1 and not queue.broken


def test_rx_chain_of_the_wrong_direction_is_skipped(ram):
    driver = PackedDriver(ram)
    queue = make_queue(ram, driver, mrg_rxbuf=True)
    bad = driver.add_chain([(driver.alloc(2000), 2000, 0)])
    driver.publish(bad)
    chains = post_rx(driver, [2000])
    batch = FrameBatch(8, 1 << 20)
    frame = ethernet_frame(500)
    batch.append(frame)
    assert queue.rx_push(batch) == 1
    assert driver.take_used() == [(bad, 0), (chains[0][0], HDR_LEN + 500)]
    assert queue.counters()["wrong_direction"] == 1


def test_a_chain_running_into_an_unavailable_descriptor_stops_the_queue(ram):
    """Bad wrap flags: the chain's second descriptor says 'not available in this lap'."""
    driver = PackedDriver(ram)
    queue = make_queue(ram, driver)
    frame = ethernet_frame(100)
    head = driver.add_chain(tx_parts(driver, frame, [20]))
    driver.desc["flags"][head + 1] = PACKED_DESC_F_USED | PACKED_DESC_F_AVAIL  # a used one
    driver.publish(head)
    batch = FrameBatch(8, 1 << 20)
    assert queue.tx_drain(batch, 8) == 0
    assert queue.broken and queue.counters()["packed_chain_not_available"] == 1
    assert driver.take_used() == []


def test_a_chain_as_long_as_the_ring_wraps_into_itself(ram):
    """NEXT on every descriptor: past the last slot the wrap counter flips and the
    head is no longer available, so the chain has no end; the queue stops."""
    driver = PackedDriver(ram, size=4)
    queue = make_queue(ram, driver)
    parts = [(driver.alloc(64), 64, 0) for _ in range(4)]
    head = driver.add_chain(parts)
    driver.desc["flags"][3] |= DESC_F_NEXT
    driver.publish(head)
    assert queue.tx_drain(FrameBatch(8, 1 << 20), 8) == 0
    assert queue.broken and queue.counters()["packed_chain_not_available"] == 1


def test_descriptors_of_the_wrong_lap_are_not_taken(ram):
    """Flags for the other wrap counter: nothing is available, nothing is counted."""
    driver = PackedDriver(ram)
    queue = make_queue(ram, driver)
    frame = ethernet_frame(100)
    head = driver.add_chain(tx_parts(driver, frame, []))
    driver._head_flags[head] = PACKED_DESC_F_USED  # the second lap's "available"
    driver.publish(head)
    assert queue.tx_drain(FrameBatch(8, 1 << 20), 8) == 0
    assert not queue.broken and queue.base == FRESH_BASE
    assert not any(queue.counters().values())
