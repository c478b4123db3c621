"""Dirty-page logging: exactly the 4 KiB pages the back-end wrote are marked, no others."""

from __future__ import annotations

import mmap
import os

import numpy as np
import pytest

from tests.support.guest_ram import (
    DESC_F_WRITE,
    HDR_LEN,
    RAM_BYTES,
    SPLIT_LAYOUT,
    Driver,
    GuestRam,
    ethernet_frame,
    tx_parts,
)
from vhostnet.virtqueue import FrameBatch, Virtqueue

PAGE = 0x1000


@pytest.fixture
def shared_log():
    """The log as QEMU hands it over: a memfd mapped shared, one bit per guest page."""
    size = RAM_BYTES // PAGE // 8
    fd = os.memfd_create("test-vhost-log")
    os.ftruncate(fd, size)
    mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
    log = np.frombuffer(mapping, dtype=np.uint8)
    yield log
    # The mapping goes when the last view does (pytest still holds this one here).
    os.close(fd)


def dirty_pages(log: np.ndarray) -> set[int]:
    bits = np.unpackbits(log, bitorder="little")
    return {int(page) for page in np.nonzero(bits)[0]}


def pages_of(gpa: int, length: int) -> set[int]:
    return set(range(gpa // PAGE, (gpa + length - 1) // PAGE + 1))


@pytest.fixture
def ram():
    guest = GuestRam(SPLIT_LAYOUT)
    yield guest
    guest.close()


def test_rx_marks_buffer_pages_and_used_ring(ram, shared_log):
    # The buffer straddles both a page boundary and the region boundary at 1 MiB.
    driver = Driver(ram, buffer_gpa=0x100000 - 0x800)
    queue = Virtqueue(ram.memory, driver.size, *driver.ring_uvas)
    queue.set_log(shared_log, driver.used_gpa, True)
    gpa = driver.alloc(0x2000)
    driver.publish(driver.add_chain([(gpa, 0x2000, DESC_F_WRITE)]))
    batch = FrameBatch(4, 1 << 20)
    batch.append(ethernet_frame(3000))
    assert queue.rx_push(batch) == 1
    # Only the bytes written count: 12 + 3000 from 0xFF800 end before the buffer's third page.
    expected = pages_of(gpa, HDR_LEN + 3000) | pages_of(driver.used_gpa, 6 + 8 * driver.size)
    assert dirty_pages(shared_log) == expected
    assert expected == {0xFF, 0x100, driver.used_gpa // PAGE}


def test_tx_marks_only_the_used_ring(ram, shared_log):
    driver = Driver(ram)
    queue = Virtqueue(ram.memory, driver.size, *driver.ring_uvas)
    queue.set_log(shared_log, driver.used_gpa, True)
    driver.publish(driver.add_chain(tx_parts(driver, ethernet_frame(5000), [])))
    assert queue.tx_drain(FrameBatch(4, 1 << 20), 4) == 1
    assert dirty_pages(shared_log) == {driver.used_gpa // PAGE}


def test_used_ring_not_logged_without_the_ring_log_flag(ram, shared_log):
    driver = Driver(ram)
    queue = Virtqueue(ram.memory, driver.size, *driver.ring_uvas, mrg_rxbuf=True)
    queue.set_log(shared_log, driver.used_gpa, False)
    buffers = [driver.alloc(PAGE) for _ in range(3)]
    driver.publish(*(driver.add_chain([(gpa, PAGE, DESC_F_WRITE)]) for gpa in buffers))
    batch = FrameBatch(4, 1 << 20)
    batch.append(ethernet_frame(2 * PAGE))  # header + frame spill into the third buffer
    assert queue.rx_push(batch) == 1
    assert dirty_pages(shared_log) == set().union(*(pages_of(gpa, PAGE) for gpa in buffers))


def test_log_bits_are_ored_into_existing_ones(ram, shared_log):
    driver = Driver(ram)
    queue = Virtqueue(ram.memory, driver.size, *driver.ring_uvas, event_idx=True)
    shared_log[:] = 0
    shared_log[0] = 0b1000_0001  # pages 0 and 7, set by someone else (another device)
    queue.set_log(shared_log, driver.used_gpa, True)
    queue.enable_kick()  # writes avail_event in the used ring
    assert dirty_pages(shared_log) == {0, 7, driver.used_gpa // PAGE}


def test_logging_stops(ram, shared_log):
    driver = Driver(ram)
    queue = Virtqueue(ram.memory, driver.size, *driver.ring_uvas)
    queue.set_log(shared_log, driver.used_gpa, True)
    queue.set_log(None)
    driver.publish(driver.add_chain(tx_parts(driver, ethernet_frame(60), [])))
    assert queue.tx_drain(FrameBatch(4, 1 << 20), 4) == 1
    assert dirty_pages(shared_log) == set()
