"""Dirty-page logging in the real vhostnet process, driven by the project's front-end.

The front-end plays QEMU's migration start (SET_LOG_BASE with a memfd,
SET_FEATURES|LOG_ALL, SET_VRING_ADDR with the LOG flag); the test then makes
vhostnet write RX buffers and used rings and compares the log with the pages
it knows were written.
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from testkit.frontend import RX_RING, TX_RING, Frontend
from tests.support.daemon import VhostnetProcess
from tests.support.frames import GATEWAY_IP, arp_request
from vhostnet.vhost_user.codec import U64, LogParams, VringAddr
from vhostnet.vhost_user.protocol import Request, VirtioFeature

PAGE = 4096
MEMORY = 64 * 1024 * 1024
LOG_BYTES = MEMORY // PAGE // 8
VRING_F_LOG = 1


class SharedLog:
    """A log memfd as QEMU makes it; ``pages()`` reads the bits vhostnet set."""

    def __init__(self, offset: int = 0) -> None:
        self.offset = offset
        self.fd = os.memfd_create("test-dirty-log")
        os.ftruncate(self.fd, offset + LOG_BYTES)
        self.map = mmap.mmap(self.fd, offset + LOG_BYTES)

    def pages(self) -> set[int]:
        bits = np.unpackbits(np.frombuffer(self.map, np.uint8, LOG_BYTES, self.offset), bitorder="little")
        return {int(p) for p in np.nonzero(bits)[0]}

    def clear(self) -> None:
        self.map[self.offset:] = bytes(LOG_BYTES)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


@pytest.fixture
def frontend(tmp_path: Path) -> Iterator[Frontend]:
    process = VhostnetProcess(tmp_path)
    try:
        with Frontend(process.socket_path, memory_size=MEMORY) as fe:
            fe.connect()
            fe.start()
            yield fe
    finally:
        alive = process.process.poll() is None
        process.stop()
        assert alive, process.log_path.read_text()


def pages_of(gpa: int, length: int) -> set[int]:
    return set(range(gpa // PAGE, (gpa + max(length, 1) - 1) // PAGE + 1))


def start_logging(fe: Frontend, shared: SharedLog, log_all: bool = True) -> None:
    answer = fe.request(Request.SET_LOG_BASE, LogParams(LOG_BYTES, shared.offset).emit(), [shared.fd])
    assert answer is not None and U64.parse(answer.payload).value == 0
    set_logging(fe, log_all)


def set_logging(fe: Frontend, on: bool) -> None:
    features = fe.acked_features | (VirtioFeature.F_LOG_ALL if on else 0)
    fe._acked(Request.SET_FEATURES, U64(features).emit())
    for ring, layout in enumerate(fe.layouts):
        addr = VringAddr(ring, VRING_F_LOG if on else 0, fe.memory.uva(layout.desc_gpa),
                         fe.memory.uva(layout.used_gpa), fe.memory.uva(layout.avail_gpa), layout.used_gpa)
        fe._acked(Request.SET_VRING_ADDR, addr.emit())


def exchange_arp(fe: Frontend, count: int) -> list[tuple[int, int]]:
    """Send ``count`` ARP requests; return the (gpa, length) of every RX buffer used."""
    for _ in range(count):
        fe.send_frame(arp_request(GATEWAY_IP))
    used: list[tuple[int, int]] = []
    deadline = time.monotonic() + 10
    while len(used) < count and time.monotonic() < deadline:
        fe._wait_call(RX_RING, 0.02)
        if fe.rx.has_used():
            used += [(int(gpa), length) for gpa, length in fe.rx.collect_used()]
    for gpa, _ in used:
        fe.slots.free(gpa)
    if fe._refill_rx():
        fe._kick(RX_RING)
    assert len(used) == count, f"only {len(used)} of {count} ARP replies arrived"
    return used


def ring_pages(fe: Frontend, ring: int) -> set[int]:
    layout = fe.layouts[ring]
    return pages_of(layout.used_gpa, 6 + 8 * layout.size)


def test_every_written_page_is_logged_and_nothing_else(frontend: Frontend) -> None:
    shared = SharedLog()
    try:
        start_logging(frontend, shared)
        used = exchange_arp(frontend, 40)
        dirty = shared.pages()
        written = set().union(*(pages_of(gpa, length) for gpa, length in used))
        rx_used = frontend.layouts[RX_RING]
        # The used-ring idx and every element vhostnet filled in.
        written |= pages_of(rx_used.used_gpa, 4)
        written |= {(rx_used.used_gpa + 4 + 8 * (i % rx_used.size)) // PAGE for i in range(len(used))}
        assert written <= dirty, f"pages written but not logged: {sorted(written - dirty)}"
        allowed = written | ring_pages(frontend, RX_RING) | ring_pages(frontend, TX_RING)
        assert dirty <= allowed, f"pages logged that vhostnet never wrote: {sorted(dirty - allowed)}"
        assert ring_pages(frontend, TX_RING) & dirty, "TX used ring writes were not logged"
    finally:
        shared.close()


def test_logging_stops_when_migration_is_cancelled(frontend: Frontend) -> None:
    shared = SharedLog()
    try:
        start_logging(frontend, shared)
        exchange_arp(frontend, 2)
        assert shared.pages()
        set_logging(frontend, False)
        shared.clear()
        exchange_arp(frontend, 5)
        assert shared.pages() == set()
    finally:
        shared.close()


def test_new_log_base_replaces_the_old_one(frontend: Frontend) -> None:
    first, second = SharedLog(), SharedLog(offset=PAGE)
    try:
        start_logging(frontend, first)
        exchange_arp(frontend, 2)
        assert first.pages()
        first.clear()
        answer = frontend.request(Request.SET_LOG_BASE, LogParams(LOG_BYTES, PAGE).emit(), [second.fd])
        assert answer is not None and U64.parse(answer.payload).value == 0
        used = exchange_arp(frontend, 3)
        assert first.pages() == set()
        assert pages_of(*used[0]) <= second.pages()
    finally:
        first.close()
        second.close()
