"""GuestMemory: mapping memfd regions, duplicates and overlaps, translation, table changes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.guest_ram import (
    DESC_F_WRITE,
    HDR_LEN,
    PC_LAYOUT,
    UVA_BASE,
    Driver,
    GuestRam,
    ethernet_frame,
    tx_parts,
)
from vhostnet.virtqueue import AddressError, FrameBatch, GuestMemory, Virtqueue


@pytest.fixture
def memfd():
    fd = os.memfd_create("test-memory")
    os.ftruncate(fd, 0x200000)
    os.pwrite(fd, b"low", 0x10)
    os.pwrite(fd, b"high", 0xC0010)
    yield fd
    os.close(fd)


def add_pc_layout(memory: GuestMemory, fd: int) -> None:
    for region in PC_LAYOUT:
        memory.add_region(region.gpa, region.size, region.uva, region.offset, fd)


def test_regions_map_the_fd_at_their_offset(memfd):
    memory = GuestMemory()
    add_pc_layout(memory, memfd)
    assert len(memory) == 2 and memory.generation == 2
    assert bytes(memory.gpa_view(0x10, 3)) == b"low"
    assert bytes(memory.gpa_view(0xC0010, 4)) == b"high"
    assert bytes(memory.uva_view(UVA_BASE + 0xC0010, 4)) == b"high"
    memory.gpa_view(0x20, 2)[:] = list(b"ok")  # views write through to the shared file
    assert os.pread(memfd, 2, 0x20) == b"ok"
    memory.close()


def test_translation(memfd):
    memory = GuestMemory()
    add_pc_layout(memory, memfd)
    assert memory.translate_gpa(0x9FFFF, 1) == (0, 0x9FFFF)
    assert memory.translate_gpa(0xC0000, 0x140000) == (1, 0)
    assert memory.translate_uva(UVA_BASE + 0xC0100, 16) == (1, 0x100)
    for gpa, length in [(0xA0000, 1), (0x9FFFF, 2), (0x200000, 1), (-1, 1), (0, -1)]:
        with pytest.raises(AddressError):
            memory.translate_gpa(gpa, length)
    with pytest.raises(AddressError):
        memory.translate_uva(0xC0000, 1)  # a gpa is not a uva
    memory.close()


def test_identical_duplicate_is_ignored_and_overlap_refused(memfd):
    memory = GuestMemory()
    add_pc_layout(memory, memfd)
    generation = memory.generation
    add_pc_layout(memory, memfd)  # QEMU 7.2 with MQ sends the table twice
    assert len(memory) == 2 and memory.generation == generation
    with pytest.raises(AddressError):
        memory.add_region(0x80000, 0x30000, UVA_BASE + 0x300000, 0, memfd)  # gpa overlap
    with pytest.raises(AddressError):
        memory.add_region(0x300000, 0x1000, UVA_BASE + 0x1000, 0, memfd)  # uva overlap
    with pytest.raises(AddressError):
        memory.add_region(0x0, 0xA0000, UVA_BASE + 0x400000, 0, memfd)  # same gpa, other uva
    assert len(memory) == 2 and memory.generation == generation
    memory.close()


def test_bad_regions_are_refused(memfd):
    memory = GuestMemory()
    with pytest.raises(AddressError):
        memory.add_region(0, 0, UVA_BASE, 0, memfd)
    with pytest.raises(AddressError):
        memory.add_region(2**64 - 0x1000, 0x2000, UVA_BASE, 0, memfd)
    with pytest.raises(AddressError):
        memory.add_region(0, 0x1000, UVA_BASE, 0, 12345)  # not an open fd
    assert len(memory) == 0 and memory.generation == 0


def test_remove_region(memfd):
    memory = GuestMemory()
    add_pc_layout(memory, memfd)
    assert not memory.remove_region(0xC0000, 0x140000, 0)  # wrong uva: not that region
    assert memory.remove_region(0xC0000, 0x140000, UVA_BASE + 0xC0000)
    assert len(memory) == 1 and memory.generation == 3
    with pytest.raises(AddressError):
        memory.translate_gpa(0xC0000, 1)
    memory.close()
    assert len(memory) == 0


def test_queue_keeps_its_mapping_until_memory_changed():
    ram = GuestRam()
    try:
        driver = Driver(ram, buffer_gpa=0xC1000)  # rings in low RAM, buffers in the high region
        queue = Virtqueue(ram.memory, driver.size, *driver.ring_uvas)
        high = PC_LAYOUT[1]
        ram.memory.remove_region(high.gpa, high.size, high.uva)
        frame = ethernet_frame(100)
        driver.publish(driver.add_chain(tx_parts(driver, frame, [])))
        batch = FrameBatch(4, 1 << 20)
        # Not told yet: the queue still uses its old table, whose mapping is still alive.
        assert queue.tx_drain(batch, 4) == 1
        queue.memory_changed()
        driver.publish(driver.add_chain(tx_parts(driver, frame, [])))
        assert queue.tx_drain(batch, 4) == 0
        assert queue.counters()["address_unmapped"] == 1
        # The region comes back (hotplug): buffers there work again after memory_changed().
        ram.memory.add_region(high.gpa, high.size, high.uva, high.offset, ram.fd)
        queue.memory_changed()
        driver.publish(driver.add_chain(tx_parts(driver, frame, [])))
        assert queue.tx_drain(batch, 4) == 1
        assert not queue.broken
    finally:
        ram.close()


def test_queue_breaks_when_its_rings_are_unmapped():
    ram = GuestRam()
    try:
        driver = Driver(ram)
        queue = Virtqueue(ram.memory, driver.size, *driver.ring_uvas)
        low = PC_LAYOUT[0]
        ram.memory.remove_region(low.gpa, low.size, low.uva)
        queue.memory_changed()
        assert queue.broken
        gpa = driver.alloc(2048)
        driver.publish(driver.add_chain([(gpa, 2048, DESC_F_WRITE)]))
        batch = FrameBatch(4, 1 << 20)
        batch.append(ethernet_frame(60))
        assert queue.rx_push(batch) == 0
        assert ram.read(gpa, HDR_LEN) == bytes(HDR_LEN)
    finally:
        ram.close()


def test_every_fault_is_caught_not_only_the_first():
    """The SIGBUS guard jumps out of the handler without restoring a saved signal mask (no
    syscall per kernel call): SIGBUS must be unblocked again after each jump, or the next
    fault kills the process. In a child process, which survives three faults or dies."""
    script = """
import os
import subprocess
import sys
from tests.support.guest_ram import Driver, GuestRam, ethernet_frame, tx_parts
from vhostnet.virtqueue import FrameBatch, Virtqueue
for _ in range(3):
    ram = GuestRam()
    driver = Driver(ram)
    queue = Virtqueue(ram.memory, driver.size, *driver.ring_uvas)
    driver.publish(driver.add_chain(tx_parts(driver, ethernet_frame(100), [])))
    os.ftruncate(ram.fd, 0)  # (this process must not touch the mapping any more either)
    assert queue.tx_drain(FrameBatch(4, 1 << 20), 4) == 0
    assert queue.faulted
print("survived")
"""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "survived"
