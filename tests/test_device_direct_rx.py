"""NetDevice's direct-RX handle (what host data is written straight into the RX ring with) is
looked up once and dropped exactly when the answer may change: a ring stops, starts, is
disabled, loses its memory or breaks; a capture is asked at every call. A guest memory fault
is acted on at the end of the kick that met it: the ring reports it (``Virtqueue.on_fault``),
the rings are no longer asked at every kick."""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from tests.support.guest_ram import DESC_F_WRITE, Driver, GuestRam, ethernet_frame, tx_parts
from vhostnet.device import NetDevice
from vhostnet.network import Network
from vhostnet.stack.config import StackConfig
from vhostnet.vhost_user.codec import MemoryRegion
from vhostnet.vhost_user.device_api import VringConfig
from vhostnet.vhost_user.protocol import VirtioFeature
from vhostnet.virtqueue import FrameBatch

RX, TX = 0, 1


class Rig:
    """A NetDevice over test guest RAM with its RX and TX rings running (``pairs`` of them)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pairs: int = 1) -> None:
        self.loop = loop
        self.ram = GuestRam()
        self.network = Network(StackConfig(tcp_forwards=[]), loop)
        self.device = NetDevice(loop, self.network, queue_pairs=pairs)
        self.device.features_set(int(VirtioFeature.VERSION_1))
        self.regions = [MemoryRegion(r.gpa, r.size, r.uva, r.offset) for r in self.ram.layout]
        for region in self.regions:
            self.device.region_added(region, os.dup(self.ram.fd))
        self.drivers = {index: Driver(self.ram, ring_gpa=0x10000 + index * 0x10000,
                                      buffer_gpa=0x100000 + index * 0x20000)
                        for index in range(2 * pairs)}
        for index in self.drivers:
            self.start(index)

    def start(self, index: int) -> None:
        driver = self.drivers[index]
        desc, avail, used = driver.ring_uvas
        self.device.ring_start(index, VringConfig(num=driver.size, desc_uva=desc, avail_uva=avail,
                                                  used_uva=used, enabled=True))

    def close(self) -> None:
        self.device.close()
        self.network.close()
        self.ram.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    loop = asyncio.new_event_loop()
    rig = Rig(loop)
    yield rig
    rig.close()
    loop.close()


def test_the_handle_is_kept_until_the_rx_ring_changes(rig: Rig) -> None:
    device = rig.device
    handle = device.direct_rx()
    assert handle is not None and device.direct_rx() is handle
    device.ring_enable(RX, False)
    assert device.direct_rx() is None
    device.ring_enable(RX, True)
    assert device.direct_rx() is handle  # the same ring: the same handle
    device.ring_stop(RX)
    assert device.direct_rx() is None
    rig.start(RX)
    restarted = device.direct_rx()
    assert restarted is not None and restarted is not handle
    device.reset()
    assert device.direct_rx() is None


def test_no_handle_while_a_capture_runs(rig: Rig) -> None:
    device = rig.device
    handle = device.direct_rx()
    device.capture = object()  # type: ignore[assignment]  # (only compared with None here)
    assert device.direct_rx() is None
    device.capture = None
    assert device.direct_rx() is handle


def test_no_handle_once_the_ring_lost_its_memory(rig: Rig) -> None:
    device = rig.device
    assert device.direct_rx() is not None
    device.region_removed(rig.regions[0])  # the rings live there: they break
    assert device.direct_rx() is None


def test_with_two_pairs_a_tcp_flow_gets_the_ring_of_the_pair_it_was_sent_on() -> None:
    """Multiqueue: host data goes straight into the RX ring of the pair the guest sends the
    flow on (pair 0 for a flow never sent, or one of another protocol); with one pair's ring
    disabled, the other is the one ring for every flow."""
    loop = asyncio.new_event_loop()
    rig = Rig(loop, pairs=2)
    try:
        device = rig.device
        guest, remote = bytes([10, 0, 2, 15]), bytes([192, 0, 2, 7])
        segment = struct.pack("!HH", 40123, 443) + bytes(16)
        frame = (bytes(6) + bytes(6) + b"\x08\x00"
                 + struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(segment), 0, 0x4000, 64, 6,
                               0, guest, remote) + segment)
        batch = FrameBatch(4, 1 << 16)
        assert batch.append(frame)
        assert device.steering is not None
        device.steering.learn(batch, 1, 1)
        flow = (6, remote, guest, 443, 40123)
        pair0 = rig.device.queues[0].direct_rx()
        pair1 = rig.device.queues[2].direct_rx()
        assert device.direct_rx(flow) is pair1 and device.direct_rx_by_flow()
        device.direct_rx_done(0)
        assert device.direct_rx((6, remote, guest, 443, 40124)) is pair0  # never sent
        assert device.direct_rx((17, remote, guest, 443, 40123)) is pair0  # another protocol
        assert device.direct_rx() is None  # no flow named: the caller asks again with one
        device.ring_enable(2, False)
        assert device.direct_rx(flow) is pair0 and device.direct_rx() is pair0
        assert not device.direct_rx_by_flow()
        device.ring_enable(2, True)
        assert device.direct_rx(flow) is pair1
    finally:
        rig.close()
        loop.close()


def kick_after_a_fault(rig: Rig, index: int, prepare: Callable[[], None]) -> list[bool]:
    """``prepare()`` (work for the ring), the front-end's memory file shrinks, then ring
    ``index`` is kicked: whether the connection was ended (``on_memory_fault``), once."""
    device, loop = rig.device, rig.loop
    ended: list[bool] = []
    device.on_memory_fault = lambda: ended.append(True)
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        device.ring_kick_fd(index, kick)
        loop.run_until_complete(asyncio.sleep(0.01))  # (the look at the ring on a new kick fd)
        prepare()
        os.ftruncate(rig.ram.fd, 0)  # (this process must not touch the mapping any more)
        os.eventfd_write(kick, 1)
        loop.run_until_complete(asyncio.sleep(0.05))
        assert device.kick_fds == {}  # no more kicks into a broken device
    finally:
        device.ring_kick_fd(index, None)
        os.close(kick)
    return ended


def fault_met_by_a_tx_kick() -> None:
    with rig_in_child() as rig:
        driver = rig.drivers[TX]
        assert kick_after_a_fault(rig, TX, lambda: driver.publish(
            driver.add_chain(tx_parts(driver, ethernet_frame(100), [])))) == [True]


def fault_met_by_an_rx_kick() -> None:
    with rig_in_child() as rig:
        device = rig.device
        assert device.direct_rx() is not None
        driver = rig.drivers[RX]

        def prepare() -> None:
            driver.publish(driver.add_chain([(driver.alloc(2048), 2048, DESC_F_WRITE)]))
            rig.network.frames_to_guest.append(ethernet_frame(100))
        assert kick_after_a_fault(rig, RX, prepare) == [True]
        assert device.direct_rx() is None  # the RX ring broke: no handle to write into


@contextlib.contextmanager
def rig_in_child() -> Iterator[Rig]:
    loop = asyncio.new_event_loop()
    rig = Rig(loop)
    try:
        yield rig
    finally:
        rig.device.close()  # (the RAM's mapping is gone: not closed here)
        rig.network.close()
        loop.close()


@pytest.mark.parametrize("scenario", [fault_met_by_a_tx_kick, fault_met_by_an_rx_kick])
def test_a_fault_met_by_a_kick_ends_the_connection(scenario: Callable[[], None]) -> None:
    """In a child process: SIGBUS would reach pytest's faulthandler first (see
    tests/virtqueue/test_guest_memory.py)."""
    script = f"from tests.test_device_direct_rx import {scenario.__name__}\n" \
             f"{scenario.__name__}()\nprint('survived')\n"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "survived"
