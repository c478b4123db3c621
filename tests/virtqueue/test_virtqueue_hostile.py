"""A hostile or broken guest: every bad chain is counted, completed empty, and contained.

Each test snapshots the whole memfd (including the fd range no region maps)
before the kernel runs and checks afterwards that nothing but the used ring
changed, or for RX nothing but the used ring and the good buffers.
"""

from __future__ import annotations

import logging
import struct

import numpy as np
import pytest

from tests.support.guest_ram import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    HDR_LEN,
    Driver,
    GuestRam,
    ethernet_frame,
    tx_parts,
)
from vhostnet.virtqueue import MAX_FRAME_BYTES, FrameBatch, Virtqueue

HOLE_GPA = 0xA0000  # the VGA/ROM hole of the pc layout: not guest RAM


@pytest.fixture
def ram():
    guest = GuestRam()
    # Mark the fd bytes behind the hole so a stray write would show.
    guest.map[HOLE_GPA:0xC0000] = b"\xa5" * 0x20000
    yield guest
    guest.close()


@pytest.fixture
def driver(ram):
    return Driver(ram)


@pytest.fixture
def queue(ram, driver):
    return Virtqueue(ram.memory, driver.size, *driver.ring_uvas)


def changed_outside(ram: GuestRam, before: bytes, allowed: list[tuple[int, int]]) -> list[int]:
    """fd offsets that changed outside the allowed guest ranges (gpa, length)."""
    after = np.frombuffer(ram.snapshot(), dtype=np.uint8).copy()
    old = np.frombuffer(before, dtype=np.uint8).copy()
    for gpa, length in allowed:
        start = ram.offset(gpa, length)
        after[start : start + length] = 0
        old[start : start + length] = 0
    return list(np.nonzero(after != old)[0][:10])


def used_ring_range(driver: Driver) -> tuple[int, int]:
    return driver.used_gpa, 6 + 8 * driver.size


def drain_expecting(ram, driver, queue, head, reason) -> None:
    """Publish ``head`` and a good frame after it: the bad one is refused, the good one passes."""
    good_frame = ethernet_frame(64, seed=99)
    good = driver.add_chain(tx_parts(driver, good_frame, []))
    driver.publish(head, good)
    before = ram.snapshot()
    batch = FrameBatch(8, 1 << 20)
    assert queue.tx_drain(batch, 8) == 1
    assert bytes(batch.frame(0)) == good_frame
    assert driver.take_used() == [(head, 0), (good, 0)]
    assert queue.counters()[reason] == 1
    assert not queue.broken
    assert changed_outside(ram, before, [used_ring_range(driver)]) == []


def test_address_outside_memory(ram, driver, queue):
    head = driver.add_chain([(HOLE_GPA + 0x100, 100, 0)])
    drain_expecting(ram, driver, queue, head, "address_unmapped")


def test_address_past_end_of_memory(ram, driver, queue):
    head = driver.add_chain([(0x1FFFF0, 0x100, 0)])  # starts in RAM, runs past its end
    drain_expecting(ram, driver, queue, head, "address_unmapped")


def test_address_plus_length_overflows(ram, driver, queue):
    head = driver.add_chain([(0xFFFF_FFFF_FFFF_FF00, 0x1000, 0)])
    drain_expecting(ram, driver, queue, head, "address_overflow")


def test_descriptor_loop(ram, driver, queue):
    buffer = driver.alloc(100, bytes(100))
    driver.write_desc(0, buffer, 100, DESC_F_NEXT, 1)
    driver.write_desc(1, buffer, 100, DESC_F_NEXT, 0)
    driver.next_desc = 2
    drain_expecting(ram, driver, queue, 0, "chain_loop_or_too_long")


def test_loop_inside_indirect_table(ram, driver, queue):
    buffer = driver.alloc(100, bytes(100))
    table = driver.alloc(32)
    driver.write_desc(0, buffer, 50, DESC_F_NEXT, 1, table_gpa=table)
    driver.write_desc(1, buffer, 50, DESC_F_NEXT, 0, table_gpa=table)
    head = driver.add_chain([(table, 32, DESC_F_INDIRECT)])
    drain_expecting(ram, driver, queue, head, "chain_loop_or_too_long")


def test_chain_as_long_as_the_ring_is_accepted(ram, driver, queue):
    frame = ethernet_frame(200)
    data = bytes(HDR_LEN) + frame
    cuts = [i * len(data) // driver.size for i in range(1, driver.size)]
    driver.publish(driver.add_chain(tx_parts(driver, frame, cuts)))
    batch = FrameBatch(8, 1 << 20)
    assert queue.tx_drain(batch, 8) == 1
    assert bytes(batch.frame(0)) == frame


def test_overlong_indirect_table(ram, driver, queue):
    table = driver.alloc(16 * 1025, bytes(16 * 1025))
    head = driver.add_chain([(table, 16 * 1025, DESC_F_INDIRECT)])
    drain_expecting(ram, driver, queue, head, "indirect_bad_length")


@pytest.mark.parametrize("length", [0, 20, 8])
def test_indirect_table_length_not_whole_descriptors(ram, driver, queue, length):
    table = driver.alloc(32, bytes(32))
    head = driver.add_chain([(table, length, DESC_F_INDIRECT)])
    drain_expecting(ram, driver, queue, head, "indirect_bad_length")


def test_indirect_table_outside_memory(ram, driver, queue):
    head = driver.add_chain([(HOLE_GPA, 32, DESC_F_INDIRECT)])
    drain_expecting(ram, driver, queue, head, "address_unmapped")


def test_nested_indirect(ram, driver, queue):
    inner = driver.alloc(16)
    outer = driver.alloc(16)
    driver.write_desc(0, driver.alloc(100, bytes(100)), 100, 0, table_gpa=inner)
    driver.write_desc(0, inner, 16, DESC_F_INDIRECT, table_gpa=outer)
    head = driver.add_chain([(outer, 16, DESC_F_INDIRECT)])
    drain_expecting(ram, driver, queue, head, "indirect_nested")


def test_indirect_with_next(ram, driver, queue):
    table = driver.alloc(16)
    driver.write_desc(0, driver.alloc(100, bytes(100)), 100, 0, table_gpa=table)
    buffer = driver.alloc(100, bytes(100))
    head = driver.add_chain([(table, 16, DESC_F_INDIRECT), (buffer, 100, 0)])
    drain_expecting(ram, driver, queue, head, "indirect_with_next")


def test_head_index_out_of_range(ram, driver, queue):
    drain_expecting(ram, driver, queue, 40, "head_out_of_range")


def test_next_index_out_of_range(ram, driver, queue):
    buffer = driver.alloc(100, bytes(100))
    driver.write_desc(0, buffer, 100, DESC_F_NEXT, 99)
    driver.next_desc = 1
    drain_expecting(ram, driver, queue, 0, "next_out_of_range")


def test_writable_descriptor_in_tx_chain(ram, driver, queue):
    parts = tx_parts(driver, ethernet_frame(100), [20])
    parts[1] = (parts[1][0], parts[1][1], DESC_F_WRITE)
    drain_expecting(ram, driver, queue, driver.add_chain(parts), "wrong_direction")


def test_zero_length_descriptors(ram, driver, queue):
    # Zero-length parts are skipped whatever their address; a chain of only those is empty.
    head = driver.add_chain([(HOLE_GPA, 0, 0), (0xFFFF_FFFF_FFFF_FFFF, 0, DESC_F_WRITE)])
    drain_expecting(ram, driver, queue, head, "tx_frame_too_short")
    frame = ethernet_frame(80)
    parts = tx_parts(driver, frame, [30])
    parts.insert(1, (HOLE_GPA, 0, 0))
    driver.publish(driver.add_chain(parts))
    batch = FrameBatch(8, 1 << 20)
    assert queue.tx_drain(batch, 8) == 1
    assert bytes(batch.frame(0)) == frame


def test_tx_frame_too_long(ram, driver, queue):
    frame = ethernet_frame(MAX_FRAME_BYTES + 1)
    head = driver.add_chain(tx_parts(driver, frame, [HDR_LEN]))
    drain_expecting(ram, driver, queue, head, "tx_frame_too_long")


def test_tx_frame_of_the_maximum_length_passes(ram, driver, queue):
    frame = ethernet_frame(MAX_FRAME_BYTES)
    driver.publish(driver.add_chain(tx_parts(driver, frame, [HDR_LEN])))
    batch = FrameBatch(2, MAX_FRAME_BYTES)
    assert queue.tx_drain(batch, 8) == 1
    assert bytes(batch.frame(0)) == frame


def test_avail_index_jump_breaks_the_queue(ram, driver, queue):
    driver.publish(driver.add_chain(tx_parts(driver, ethernet_frame(64), [])))
    driver.set_avail_idx(driver.size + 1)
    before = ram.snapshot()
    batch = FrameBatch(8, 1 << 20)
    assert queue.tx_drain(batch, 8) == 0
    assert queue.broken
    assert queue.counters()["avail_idx_jump"] == 1
    # A broken queue touches nothing any more.
    assert queue.tx_drain(batch, 8) == 0
    assert not queue.enable_kick()
    queue.disable_kick()
    assert not queue.notify()
    batch.append(ethernet_frame(64))
    assert queue.rx_push(batch) == 0
    assert ram.snapshot() == before


def test_each_reason_is_logged_once(ram, driver, queue, caplog):
    caplog.set_level(logging.WARNING, logger="vhostnet.virtqueue")
    batch = FrameBatch(8, 1 << 20)
    for _ in range(3):
        driver.publish(driver.add_chain([(HOLE_GPA, 64, 0)]))
        queue.tx_drain(batch, 8)
    driver.publish(40)
    queue.tx_drain(batch, 8)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "address_unmapped" in messages[0] and "head_out_of_range" in messages[1]
    assert queue.counters()["address_unmapped"] == 3


# ------------------------------------------------------------------------- RX


def post_rx(driver: Driver, parts_per_chain: list[list[tuple[int, int]]]) -> list[int]:
    """Post chains of (length, flags) parts; returns heads."""
    heads = [
        driver.add_chain([(driver.alloc(length), length, flags) for length, flags in parts])
        for parts in parts_per_chain
    ]
    driver.publish(*heads)
    return heads


def test_rx_readable_descriptor_is_refused_and_frame_goes_to_next_chain(ram, driver, queue):
    heads = post_rx(driver, [[(2048, 0)], [(2048, DESC_F_WRITE)]])
    batch = FrameBatch(8, 1 << 20)
    frame = ethernet_frame(100)
    batch.append(frame)
    assert queue.rx_push(batch) == 1
    assert driver.take_used() == [(heads[0], 0), (heads[1], HDR_LEN + 100)]
    assert queue.counters()["wrong_direction"] == 1


def test_rx_unmapped_buffer_is_never_written(ram, driver, queue):
    head = driver.add_chain([(HOLE_GPA, 2048, DESC_F_WRITE)])
    driver.publish(head)
    before = ram.snapshot()
    batch = FrameBatch(8, 1 << 20)
    batch.append(ethernet_frame(100))
    assert queue.rx_push(batch) == 0
    assert driver.take_used() == [(head, 0)]
    assert queue.counters()["address_unmapped"] == 1
    assert changed_outside(ram, before, [used_ring_range(driver)]) == []


def test_rx_without_mrg_frame_larger_than_buffer_is_dropped(ram, driver, queue):
    heads = post_rx(driver, [[(200, DESC_F_WRITE)]])
    batch = FrameBatch(8, 1 << 20)
    batch.append(ethernet_frame(1000))
    batch.append(ethernet_frame(100))
    assert queue.rx_push(batch) == 2  # the big one dropped, the small one delivered
    assert driver.take_used() == [(heads[0], HDR_LEN + 100)]
    assert queue.counters()["rx_buffer_too_small"] == 1


def test_rx_mrg_bad_chain_behind_good_one(ram, driver):
    queue = Virtqueue(ram.memory, driver.size, *driver.ring_uvas, mrg_rxbuf=True)
    heads = post_rx(
        driver,
        [[(1000, DESC_F_WRITE)], [(1000, 0)], [(2000, DESC_F_WRITE)]],
    )
    batch = FrameBatch(8, 1 << 20)
    frame = ethernet_frame(1500)
    batch.append(frame)
    assert queue.rx_push(batch) == 1
    # The first good chain comes back empty rather than the frame being split around a bad one.
    assert driver.take_used() == [(heads[0], 0), (heads[1], 0), (heads[2], HDR_LEN + 1500)]
    assert queue.counters()["wrong_direction"] == 1


def test_rx_mrg_frame_larger_than_the_whole_ring_is_dropped(ram):
    driver = Driver(ram, size=4)
    queue = Virtqueue(ram.memory, driver.size, *driver.ring_uvas, mrg_rxbuf=True)
    post_rx(driver, [[(100, DESC_F_WRITE)]] * 4)
    batch = FrameBatch(8, 1 << 20)
    batch.append(ethernet_frame(1500))
    batch.append(ethernet_frame(300))
    assert queue.rx_push(batch) == 2
    used = driver.take_used()
    assert [length for _, length in used] == [100, 100, 100, 12]
    assert queue.counters()["rx_buffer_too_small"] == 1


def test_rx_zero_length_descriptors_are_skipped(ram, driver, queue):
    gpa = driver.alloc(2048)
    head = driver.add_chain([(HOLE_GPA, 0, DESC_F_WRITE), (gpa, 2048, DESC_F_WRITE)])
    driver.publish(head)
    batch = FrameBatch(8, 1 << 20)
    frame = ethernet_frame(100)
    batch.append(frame)
    assert queue.rx_push(batch) == 1
    assert ram.read(gpa + HDR_LEN, 100) == frame
    assert struct.unpack("<H", ram.read(gpa + 10, 2))[0] == 1


# --------------------------------------------------------------------- fuzz

ARENA = (0x40000, 0x20000)  # where the random descriptors may legitimately point


def random_descriptor(rng, driver: Driver, index: int, table_gpa: int | None = None) -> None:
    kind = rng.randrange(6)
    if kind <= 2:
        addr = ARENA[0] + rng.randrange(ARENA[1] - 0x1000)
        length = rng.choice([0, 1, 11, 12, 60, 700, 0x1000])
    elif kind == 3:
        addr, length = HOLE_GPA + rng.randrange(0x20000), rng.randrange(1, 0x3000)
    elif kind == 4:
        addr, length = rng.getrandbits(64), rng.getrandbits(32)
    else:  # an indirect table somewhere in the arena, maybe of a sane size
        addr = ARENA[0] + 16 * rng.randrange(ARENA[1] // 16 - 64)
        length = rng.choice([16, 48, 160, 17, 0, 16 * 1100])
    flags = rng.getrandbits(3)
    driver.write_desc(index, addr, length, flags, rng.randrange(40), table_gpa=table_gpa)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("mode", ["tx", "rx", "rx_mrg"])
def test_random_rings_never_escape(ram, mode, seed):
    import random

    rng = random.Random(seed)
    driver = Driver(ram, size=32)
    queue = Virtqueue(ram.memory, driver.size, *driver.ring_uvas, mrg_rxbuf=mode == "rx_mrg")
    # Random bytes in the arena double as data and as indirect tables.
    ram.write(ARENA[0], rng.randbytes(ARENA[1]))
    for slot in range(0, ARENA[1] // 16, 37):
        random_descriptor(rng, driver, slot, table_gpa=ARENA[0])
    batch = FrameBatch(64, 1 << 22)
    before = ram.snapshot()
    consumed = 0
    for _ in range(60):
        for index in rng.sample(range(driver.size), 6):
            random_descriptor(rng, driver, index)
        # A well-behaved index (the avail-jump test covers a bad one): never more than the ring.
        room = driver.size - ((driver.avail_idx - queue.last_avail_idx) & 0xFFFF)
        driver.publish(*(rng.randrange(36) for _ in range(min(room, rng.randrange(1, 8)))))
        if mode == "tx":
            batch.clear()
            queue.tx_drain(batch, 64)
        else:
            batch.clear()
            for length in (60, 1514, 9000):
                batch.append(ethernet_frame(length))
            queue.rx_push(batch)
        consumed = queue.last_avail_idx
        assert not queue.broken
        assert driver.used_idx() == queue.used_idx == consumed  # every chain taken is completed
    allowed = [used_ring_range(driver)]
    if mode != "tx":
        allowed.append(ARENA)
    assert (
        changed_outside(
            ram,
            before,
            allowed
            + [(driver.desc_gpa, 16 * driver.size), (driver.avail_gpa, 6 + 2 * driver.size)],
        )
        == []
    )
    assert consumed > 0
