"""The split-ring kernel on the normal paths: TX, RX, notifications, kicks, FrameBatch."""

from __future__ import annotations

import os
import struct

import pytest

from tests.support.guest_ram import (
    AVAIL_F_NO_INTERRUPT,
    DESC_F_WRITE,
    HDR_LEN,
    SPLIT_LAYOUT,
    USED_F_NO_NOTIFY,
    Driver,
    GuestRam,
    ethernet_frame,
    tx_parts,
)
from vhostnet.virtqueue import MAX_FRAME_BYTES, AddressError, FrameBatch, Virtqueue


@pytest.fixture
def ram():
    guest = GuestRam()
    yield guest
    guest.close()


def make_queue(ram: GuestRam, driver: Driver, **options) -> Virtqueue:
    return Virtqueue(ram.memory, driver.size, *driver.ring_uvas, **options)


def read_call(fd: int) -> int | None:
    try:
        return struct.unpack("<Q", os.read(fd, 8))[0]
    except BlockingIOError:
        return None


# ------------------------------------------------------------------ FrameBatch


def test_frame_batch_append_and_read_back():
    batch = FrameBatch(capacity_frames=2, buffer_bytes=100)
    assert batch.append(b"a" * 60)
    assert not batch.append(b"b" * 60)  # buffer bytes exhausted
    assert batch.append(bytearray(b"c" * 40))
    assert not batch.append(b"d")  # frame slots exhausted
    assert batch.count == 2 and len(batch) == 2
    assert bytes(batch.frame(0)) == b"a" * 60 and batch.length(1) == 40
    assert bytes(batch.frame(1)) == b"c" * 40
    with pytest.raises(IndexError):
        batch.frame(2)
    batch.clear()
    assert batch.count == 0
    with pytest.raises(ValueError):
        FrameBatch(4, 1 << 20).append(bytes(MAX_FRAME_BYTES + 1))


# ------------------------------------------------------------------------- TX


def test_tx_single_descriptor(ram):
    driver = Driver(ram)
    queue = make_queue(ram, driver)
    frame = ethernet_frame(100)
    driver.publish(driver.add_chain(tx_parts(driver, frame, [])))
    batch = FrameBatch(8, 1 << 20)
    assert queue.tx_drain(batch, 8) == 1
    assert bytes(batch.frame(0)) == frame
    assert driver.take_used() == [(0, 0)]
    assert queue.last_avail_idx == 1 and queue.used_idx == 1


def test_tx_header_split_across_descriptors(ram):
    driver = Driver(ram)
    queue = make_queue(ram, driver)
    frame = ethernet_frame(300, seed=7)
    # Header cut in three (5 + 4 + 3 bytes), the third piece also carries frame bytes.
    head = driver.add_chain(tx_parts(driver, frame, [5, 9, 40, 200]))
    driver.publish(head)
    batch = FrameBatch(8, 1 << 20)
    assert queue.tx_drain(batch, 8) == 1
    assert bytes(batch.frame(0)) == frame
    assert driver.take_used() == [(head, 0)]


def test_tx_indirect_and_zero_length_parts(ram):
    driver = Driver(ram)
    queue = make_queue(ram, driver)
    frame = ethernet_frame(200, seed=3)
    parts = tx_parts(driver, frame, [12, 50])
    parts.insert(1, (0, 0, 0))  # a zero-length descriptor is skipped, even at address 0
    head = driver.add_indirect(parts)
    driver.publish(head)
    batch = FrameBatch(8, 1 << 20)
    assert queue.tx_drain(batch, 8) == 1
    assert bytes(batch.frame(0)) == frame


def test_tx_respects_max_frames_and_batch_room(ram):
    driver = Driver(ram)
    queue = make_queue(ram, driver)
    frames = [ethernet_frame(500, seed=s) for s in range(5)]
    driver.publish(*(driver.add_chain(tx_parts(driver, f, [])) for f in frames))
    small = FrameBatch(8, 1200)  # room for two 500-byte frames
    assert queue.tx_drain(small, 8) == 2
    assert queue.last_avail_idx == 2  # the third chain stays in the ring
    batch = FrameBatch(8, 1 << 20)
    assert queue.tx_drain(batch, 1) == 1
    assert queue.tx_drain(batch, 8) == 2
    assert [bytes(batch.frame(i)) for i in range(3)] == frames[2:]
    assert len(driver.take_used()) == 5


def test_tx_buffer_crossing_region_boundary():
    ram = GuestRam(SPLIT_LAYOUT)
    try:
        driver = Driver(ram, buffer_gpa=0x100000 - 700)
        queue = make_queue(ram, driver)
        frame = ethernet_frame(1400, seed=9)
        parts = tx_parts(driver, frame, [])
        assert parts[0][0] < 0x100000 < parts[0][0] + parts[0][1]
        driver.publish(driver.add_chain(parts))
        batch = FrameBatch(8, 1 << 20)
        assert queue.tx_drain(batch, 8) == 1
        assert bytes(batch.frame(0)) == frame
    finally:
        ram.close()


def test_tx_restarts_from_base(ram):
    driver = Driver(ram)
    frames = [ethernet_frame(80, seed=s) for s in range(3)]
    driver.publish(*(driver.add_chain(tx_parts(driver, f, [])) for f in frames))
    queue = make_queue(ram, driver, base=2)  # the first two were handled by an earlier back-end
    batch = FrameBatch(8, 1 << 20)
    assert queue.tx_drain(batch, 8) == 1
    assert bytes(batch.frame(0)) == frames[2]


# ------------------------------------------------------------------------- RX


def post_rx(driver: Driver, sizes: list[int]) -> list[tuple[int, list[int]]]:
    """Post one writable single-buffer chain per size; returns (head, [buffer gpa])."""
    chains = []
    for size in sizes:
        gpa = driver.alloc(size)
        head = driver.add_chain([(gpa, size, DESC_F_WRITE)])
        chains.append((head, [gpa]))
    driver.publish(*(head for head, _ in chains))
    return chains


def test_rx_without_mrg_rxbuf(ram):
    driver = Driver(ram)
    queue = make_queue(ram, driver)
    chains = post_rx(driver, [2048, 2048])
    batch = FrameBatch(8, 1 << 20)
    frames = [ethernet_frame(60), ethernet_frame(1514, seed=5)]
    for frame in frames:
        batch.append(frame)
    assert queue.rx_push(batch) == 2
    used = driver.take_used()
    assert used == [(chains[0][0], HDR_LEN + 60), (chains[1][0], HDR_LEN + 1514)]
    for (_, (gpa,)), frame in zip(chains, frames, strict=True):
        data = ram.read(gpa, HDR_LEN + len(frame))
        assert data[:10] == bytes(10)
        assert struct.unpack("<H", data[10:12])[0] == 1  # num_buffers
        assert data[HDR_LEN:] == frame


def test_rx_waits_for_buffers(ram):
    driver = Driver(ram)
    queue = make_queue(ram, driver)
    batch = FrameBatch(8, 1 << 20)
    batch.append(ethernet_frame(100))
    batch.append(ethernet_frame(100, seed=2))
    assert queue.rx_push(batch) == 0
    post_rx(driver, [2048])
    assert queue.rx_push(batch) == 1
    post_rx(driver, [2048])
    assert queue.rx_push(batch, 1) == 1
    assert len(driver.take_used()) == 2


def test_rx_header_split_over_descriptors_in_one_chain(ram):
    driver = Driver(ram)
    queue = make_queue(ram, driver, hdr_len=12)
    buffers = [driver.alloc(n) for n in (7, 5, 2000)]
    head = driver.add_chain(
        [(gpa, n, DESC_F_WRITE) for gpa, n in zip(buffers, (7, 5, 2000), strict=True)]
    )
    driver.publish(head)
    batch = FrameBatch(8, 1 << 20)
    frame = ethernet_frame(1000)
    batch.append(frame)
    assert queue.rx_push(batch) == 1
    assert driver.take_used() == [(head, HDR_LEN + 1000)]
    header = ram.read(buffers[0], 7) + ram.read(buffers[1], 5)
    assert header == bytes(10) + b"\x01\x00"
    assert ram.read(buffers[2], 1000) == frame


def test_rx_mrg_rxbuf_spreads_frame_and_sets_num_buffers(ram):
    driver = Driver(ram)
    queue = make_queue(ram, driver, mrg_rxbuf=True)
    chains = post_rx(driver, [1000, 1000, 1000, 1000])
    batch = FrameBatch(8, 1 << 20)
    big = ethernet_frame(2500, seed=11)
    small = ethernet_frame(200, seed=12)
    batch.append(big)
    batch.append(small)
    assert queue.rx_push(batch) == 2
    used = driver.take_used()
    # 12 + 2500 bytes over three 1000-byte buffers, then the small frame in the fourth.
    assert used == [
        (chains[0][0], 1000),
        (chains[1][0], 1000),
        (chains[2][0], 512),
        (chains[3][0], HDR_LEN + 200),
    ]
    stream = b"".join(
        ram.read(gpa, length) for (_, (gpa,)), (_, length) in zip(chains[:3], used[:3], strict=True)
    )
    assert struct.unpack("<H", stream[10:12])[0] == 3
    assert stream[HDR_LEN:] == big
    assert struct.unpack("<H", ram.read(chains[3][1][0] + 10, 2))[0] == 1


def test_rx_mrg_rxbuf_waits_for_enough_buffers(ram):
    driver = Driver(ram)
    queue = make_queue(ram, driver, mrg_rxbuf=True)
    post_rx(driver, [1000])
    batch = FrameBatch(8, 1 << 20)
    batch.append(ethernet_frame(1500))
    assert queue.rx_push(batch) == 0
    assert driver.take_used() == [] and queue.last_avail_idx == 0  # nothing half-written
    post_rx(driver, [1000])
    assert queue.rx_push(batch) == 1
    assert [length for _, length in driver.take_used()] == [1000, 512]


def test_rx_buffer_crossing_region_boundary():
    ram = GuestRam(SPLIT_LAYOUT)
    try:
        driver = Driver(ram, buffer_gpa=0x100000 - 100)
        queue = make_queue(ram, driver)
        chains = post_rx(driver, [4096])
        batch = FrameBatch(8, 1 << 20)
        frame = ethernet_frame(1500, seed=4)
        batch.append(frame)
        assert queue.rx_push(batch) == 1
        assert ram.read(chains[0][1][0] + HDR_LEN, 1500) == frame
    finally:
        ram.close()


# ------------------------------------------------------------- notifications


@pytest.fixture
def call_fd():
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    yield fd
    os.close(fd)


def complete_tx(driver: Driver, queue: Virtqueue, count: int) -> None:
    driver.publish(
        *(driver.add_chain(tx_parts(driver, ethernet_frame(60), [])) for _ in range(count))
    )
    assert queue.tx_drain(FrameBatch(32, 1 << 20), 32) == count


def test_notify_without_event_idx_honours_no_interrupt(ram, call_fd):
    driver = Driver(ram)
    queue = make_queue(ram, driver, call_fd=call_fd)
    assert not queue.notify()  # nothing used yet
    complete_tx(driver, queue, 1)
    assert queue.notify()
    assert read_call(call_fd) == 1
    assert not queue.notify()  # nothing new since
    driver.set_avail_flags(AVAIL_F_NO_INTERRUPT)
    complete_tx(driver, queue, 1)
    assert not queue.notify()
    assert read_call(call_fd) is None


def test_notify_with_event_idx(ram, call_fd):
    driver = Driver(ram)
    queue = make_queue(ram, driver, event_idx=True, call_fd=call_fd)
    driver.set_used_event(2)  # "interrupt me once used->idx passes 2"
    complete_tx(driver, queue, 2)  # used 0 -> 2: entry 2 not yet used
    assert not queue.notify()
    assert read_call(call_fd) is None
    complete_tx(driver, queue, 1)  # used 2 -> 3 crosses used_event
    assert queue.notify()
    assert read_call(call_fd) == 1
    complete_tx(driver, queue, 3)  # 3 -> 6, used_event still 2: already signalled
    assert not queue.notify()
    driver.set_used_event(7)
    complete_tx(driver, queue, 4)  # 6 -> 10 crosses 7
    assert queue.notify()
    assert read_call(call_fd) == 1


def test_a_long_tx_drain_hands_buffers_back_every_64_chains(ram, call_fd):
    """The guest refills the ring while the drain goes on, instead of waiting for its end."""
    driver = Driver(ram, size=256)
    queue = make_queue(ram, driver, call_fd=call_fd)  # no EVENT_IDX: every publish may interrupt
    driver.publish(*(driver.add_chain(tx_parts(driver, ethernet_frame(60), [])) for _ in range(200)))
    assert queue.tx_drain(FrameBatch(256, 1 << 20), 256) == 200
    assert driver.used_idx() == 200
    assert read_call(call_fd) == 3, "one interrupt at each of 64, 128 and 192 used chains"
    assert queue.notify()  # the last 8
    assert read_call(call_fd) == 1


def test_restart_wakes_a_guest_whose_interrupt_was_lost(ram, call_fd):
    """Migration: the old back-end used entries 0..2 and its interrupt never reached the guest."""
    driver = Driver(ram)
    driver.set_used_event(0)  # the guest last asked for an interrupt when used->idx passes 0
    old = make_queue(ram, driver, event_idx=True, call_fd=call_fd)
    complete_tx(driver, old, 3)
    assert old.notify()
    assert read_call(call_fd) == 1  # ...and this call is what the stopped QEMU drops
    restarted = make_queue(ram, driver, event_idx=True, call_fd=call_fd, base=3)
    complete_tx(driver, restarted, 1)  # used 3 -> 4; used_event 0 lies behind: nothing is due
    assert not restarted.notify()
    assert read_call(call_fd) is None  # the guest would wait forever
    assert restarted.signal_restart()
    assert read_call(call_fd) == 1


def test_kick_suppression_without_event_idx(ram):
    driver = Driver(ram)
    queue = make_queue(ram, driver)
    queue.disable_kick()
    assert driver.used_flags() & USED_F_NO_NOTIFY
    assert not queue.enable_kick()
    assert not driver.used_flags() & USED_F_NO_NOTIFY


def test_enable_kick_reports_buffers_that_raced_in(ram):
    driver = Driver(ram)
    queue = make_queue(ram, driver, event_idx=True)
    complete_tx(driver, queue, 2)
    assert not queue.enable_kick()
    assert driver.avail_event() == 2
    # The guest adds a buffer after we drained, before it could see avail_event.
    driver.publish(driver.add_chain(tx_parts(driver, ethernet_frame(60), [])))
    assert queue.enable_kick()
    assert queue.tx_drain(FrameBatch(4, 1 << 20), 4) == 1
    assert not queue.enable_kick()
    assert driver.avail_event() == 3


def test_ring_outside_memory_is_refused(ram):
    with pytest.raises(AddressError):
        Virtqueue(ram.memory, 16, 0xDEAD0000, 0xDEAD1000, 0xDEAD2000)
    driver = Driver(ram)
    with pytest.raises(ValueError):
        Virtqueue(ram.memory, 12, *driver.ring_uvas)  # not a power of two


def test_indices_wrap_at_16_bits(ram):
    driver = Driver(ram)
    start = 0xFFFE
    driver.avail_idx = start
    driver.used_seen = start
    driver.ram.write(driver.used_gpa + 2, struct.pack("<H", start))
    queue = make_queue(ram, driver, base=start)
    assert queue.used_idx == start  # read back from the used ring, where the guest left it
    frames = [ethernet_frame(70, seed=s) for s in range(4)]
    driver.publish(*(driver.add_chain(tx_parts(driver, f, [])) for f in frames))
    batch = FrameBatch(8, 1 << 20)
    assert queue.tx_drain(batch, 8) == 4
    assert [bytes(batch.frame(i)) for i in range(4)] == frames
    assert queue.last_avail_idx == 2 and queue.used_idx == 2
    assert len(driver.take_used()) == 4


@pytest.mark.parametrize("event_idx", [True, False])
def test_starved_rx_waits_for_new_buffers_not_old_ones(ram, event_idx):
    driver = Driver(ram)
    queue = make_queue(ram, driver, mrg_rxbuf=True, event_idx=event_idx)
    post_rx(driver, [1000])
    batch = FrameBatch(8, 1 << 20)
    batch.append(ethernet_frame(1500))
    assert queue.rx_push(batch) == 0
    # One buffer is waiting but cannot hold the frame: nothing new to retry with.
    assert not queue.enable_kick()
    if event_idx:
        assert driver.avail_event() == 1  # kick me when buffer #1 (the next one) arrives
    post_rx(driver, [1000])
    assert queue.enable_kick()
    assert queue.rx_push(batch) == 1
    assert not queue.enable_kick()
    if event_idx:
        assert driver.avail_event() == 2


def test_tx_chains_left_behind_are_reported_by_enable_kick(ram):
    driver = Driver(ram)
    queue = make_queue(ram, driver, event_idx=True)
    driver.publish(*(driver.add_chain(tx_parts(driver, ethernet_frame(60), [])) for _ in range(3)))
    assert queue.tx_drain(FrameBatch(8, 1 << 20), 2) == 2
    assert queue.enable_kick()  # one chain still waits: drain again rather than sleep
    assert queue.tx_drain(FrameBatch(8, 1 << 20), 2) == 1
    assert not queue.enable_kick()


def test_tx_drain_rearm_is_drain_notify_and_enable_kick_in_one_call(ram, call_fd):
    driver = Driver(ram)
    queue = make_queue(ram, driver, event_idx=True, call_fd=call_fd)
    frames = [ethernet_frame(60 + i) for i in range(3)]
    driver.publish(*(driver.add_chain(tx_parts(driver, f, [])) for f in frames))
    batch = FrameBatch(8, 1 << 20)
    assert batch.append(b"left from the last kick")
    # A full batch: no kick re-armed, drain again; the used chains notified.
    assert queue.tx_drain_rearm(batch, 2) == (2, True)
    assert [bytes(batch.frame(i)) for i in range(batch.count)] == frames[:2]  # emptied first
    assert read_call(call_fd) == 1
    # The last one: fewer than asked, kicks re-armed at the next avail index, nothing waits.
    assert queue.tx_drain_rearm(batch, 2) == (1, False)
    assert [bytes(batch.frame(i)) for i in range(batch.count)] == frames[2:]
    assert driver.avail_event() == 3
    read_call(call_fd)  # (whether used 2 -> 3 was due is test_notify_with_event_idx's)
    # Empty: no interrupt for nothing.
    assert queue.tx_drain_rearm(batch, 2) == (0, False)
    assert read_call(call_fd) is None
    assert batch.count == 0
    with pytest.raises(ValueError):
        queue.tx_drain_rearm(batch, 0)
