"""A TX ring's kick taken by the UDP fast path's C reader (``TxKick``, ext/udp_reader.pxi): the
eventfd read, the ring drained and the datagrams of an established flow sent in one call, with
no Python frame of vhostnet at all; what it does not take (a new flow's first
datagram) goes on in Python with the same batch; a capture, a disabled ring or the watchdog
off are the device's to handle. The host's answer goes into the RX ring with no call into the
device while its watchdog is on (``direct_rx_quiet``). Real NetDevice over test guest RAM,
real sockets on loopback.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.frames import GATEWAY_IP, guest_udp_frame
from tests.support.guest_ram import DESC_F_WRITE, tx_parts
from tests.test_device_direct_rx import RX, TX, Rig

VHOSTNET = str(Path(__file__).resolve().parents[1] / "vhostnet")
GUEST_PORT = 40999


class Kicked:
    """A rig whose TX ring is kicked through a real eventfd, a host UDP socket to talk to, and
    the file of the Python frame that drains the TX ring through its ``Virtqueue`` at each
    kick (the C reader drains the C queue itself: no such frame)."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.device = rig.device
        self.kick = os.eventfd(0, os.EFD_NONBLOCK)
        self.host = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.host.bind(("127.0.0.1", 0))
        self.host.settimeout(2)
        self.port = self.host.getsockname()[1]
        self.drainers: list[str] = []
        self.device.ring_kick_fd(TX, self.kick)
        self.run()  # (the look at the ring on a new kick fd)
        queue = self.device.queues[TX]
        drain = queue.tx_drain_rearm

        def recording(*args):  # (an instance attribute: the device finds it)
            self.drainers.append(sys._getframe(1).f_code.co_filename)
            return drain(*args)
        queue.tx_drain_rearm = recording  # type: ignore[method-assign]

    def run(self, seconds: float = 0.02) -> None:
        self.rig.loop.run_until_complete(asyncio.sleep(seconds))

    def publish_and_kick(self, payload: bytes) -> None:
        """The guest puts a datagram of ``payload`` to the host socket in its TX ring, kicks."""
        driver = self.rig.drivers[TX]
        frame = guest_udp_frame(GUEST_PORT, GATEWAY_IP, self.port, payload)
        driver.publish(driver.add_chain(tx_parts(driver, frame, [])))
        self.drainers.clear()
        os.eventfd_write(self.kick, 1)

    def send(self, payload: bytes) -> bytes:
        """The guest sends ``payload`` to the host socket and kicks; what the host received."""
        self.publish_and_kick(payload)
        self.run()
        payload, self.peer = self.host.recvfrom(2048)
        return payload

    def python_of_kick(self, payload: bytes) -> list[str]:
        """The guest sends ``payload``; the kick's reader is called at once (as the loop would),
        under a profiler: the Python functions of vhostnet it ran."""
        self.publish_and_kick(payload)
        reader = self.device._tx_kicks[TX]  # (what the loop calls for the kick fd)
        ran: list[str] = []

        def profile(frame, event, arg) -> None:
            if event == "call" and frame.f_code.co_filename.startswith(VHOSTNET):
                ran.append(frame.f_code.co_qualname)
        sys.setprofile(profile)
        try:
            reader()
        finally:
            sys.setprofile(None)
        assert self.host.recvfrom(2048)[0] == payload
        return ran

    def offer_rx(self, buffers: int):
        """The guest offers ``buffers`` 2 KiB RX buffers; its RX ring driver."""
        rx = self.rig.drivers[RX]
        for _ in range(buffers):
            gpa = rx.alloc(2048)
            assert rx.queue_chain([(gpa, 2048, DESC_F_WRITE)], gpa)
        return rx

    def drained_in_python(self) -> bool:
        """Whether the last kick's drain went through vhostnet's Python (the device's
        ``Virtqueue.tx_drain_rearm``), not the C reader alone."""
        return any(name.startswith(VHOSTNET) for name in self.drainers)

    def close(self) -> None:
        self.device.ring_kick_fd(TX, None)
        os.close(self.kick)
        self.host.close()


@pytest.fixture
def kicked() -> Iterator[Kicked]:
    loop = asyncio.new_event_loop()
    rig = Rig(loop)
    kicked = Kicked(rig)
    yield kicked
    kicked.close()
    rig.close()
    loop.close()


def test_an_established_flows_datagram_is_sent_by_the_c_reader(kicked: Kicked) -> None:
    device = kicked.device
    assert kicked.send(b"first") == b"first"  # (a new flow: the Python stack opens it)
    for payload in (b"second", b"third"):
        assert kicked.send(payload) == payload
        assert not kicked.drained_in_python()
    assert device.counters["tx.frames"] == 3
    counters = device.network.counters()
    assert counters["udp.fast_path"] == 2
    assert counters["udp.tx_host"] == 3


def test_an_established_flows_kick_runs_no_python_of_vhostnet(kicked: Kicked) -> None:
    assert kicked.send(b"first") == b"first"  # (the flow opened in Python; the watchdog on)
    # (the fast path's first batch is bound to the device's in Python)
    assert "UdpFastSender.send_batch" in kicked.python_of_kick(b"second")
    for payload in (b"third", b"fourth"):
        assert kicked.python_of_kick(payload) == []
    assert kicked.device.counters["tx.frames"] == 4
    assert kicked.device.network.counters()["udp.fast_path"] == 3


class Seen:
    """A capture that counts the frames it is shown."""

    frames = 0

    def add_batch(self, batch, count: int, start: int = 0) -> None:
        self.frames += count


def test_a_capture_sends_the_kick_to_the_devices_python(kicked: Kicked) -> None:
    kicked.send(b"first")
    seen = Seen()
    kicked.device.capture = seen  # type: ignore[assignment]
    assert kicked.send(b"captured") == b"captured"
    assert kicked.drained_in_python() and seen.frames == 1
    kicked.device.capture = None
    assert kicked.send(b"not captured") == b"not captured"
    assert not kicked.drained_in_python() and seen.frames == 1


def test_a_disabled_ring_discards_as_before(kicked: Kicked) -> None:
    device = kicked.device
    kicked.send(b"first")
    device.ring_enable(TX, False)
    with pytest.raises(TimeoutError):
        kicked.host.settimeout(0.1)
        kicked.send(b"dropped")
    assert kicked.drained_in_python()
    assert device.counters["tx.discarded"] == 1
    device.ring_enable(TX, True)
    kicked.host.settimeout(2)
    assert kicked.send(b"again") == b"again"
    assert not kicked.drained_in_python()


def test_a_kick_turns_the_stopped_watchdog_on(kicked: Kicked) -> None:
    device = kicked.device
    kicked.send(b"first")
    device._stop_watchdog()
    assert device._watch_timer is None
    assert kicked.send(b"watch") == b"watch"
    assert not kicked.drained_in_python()
    assert device._watch_timer is not None


def test_a_send_error_reaches_the_flow(kicked: Kicked) -> None:
    """The host socket goes away: the connected flow socket's send fails (the port
    unreachable the kernel got), reported to the UDP engine from the C reader's batch."""
    kicked.send(b"first")
    kicked.host.close()
    driver = kicked.rig.drivers[TX]
    for payload in (b"lost", b"refused"):
        frame = guest_udp_frame(GUEST_PORT, GATEWAY_IP, kicked.port, payload)
        driver.publish(driver.add_chain(tx_parts(driver, frame, [])))
        os.eventfd_write(kicked.kick, 1)
        kicked.run()
    counters = kicked.device.network.counters()
    assert counters.get("udp.port_unreachable", 0) + counters.get("udp.host_error", 0) >= 1
    assert not kicked.drained_in_python()


def test_an_answer_goes_into_the_rx_ring_without_the_devices_python(kicked: Kicked) -> None:
    device = kicked.device
    rx = kicked.offer_rx(4)
    kicked.send(b"first")
    kicked.send(b"second")
    completions: list[int] = []
    done = device.direct_rx_done

    def recording(frames: int) -> None:
        completions.append(frames)
        done(frames)
    device.direct_rx_done = recording  # type: ignore[method-assign]
    frames = device.counters["rx.frames"]
    kicked.host.sendto(b"answer", kicked.peer)
    kicked.run()
    assert device.counters["rx.frames"] == frames + 1
    assert completions == []  # (the watchdog is on: nothing to tell the device)
    assert len(rx.collect_used()) == 1
    device._stop_watchdog()  # off: the next write turns it on through the device
    kicked.host.sendto(b"again", kicked.peer)
    kicked.run()
    assert completions == [1] and device.counters["rx.frames"] == frames + 2
    assert device._watch_timer is not None
    assert len(rx.collect_used()) == 1


def test_the_kept_rx_handle_is_dropped_when_the_rings_change(kicked: Kicked) -> None:
    """The flow reader keeps the device's direct-write handle between answers: a disabled RX
    ring, or a capture, must stop the direct writes at once (the answer waits in the queue)."""
    device = kicked.device
    rx = kicked.offer_rx(4)
    kicked.send(b"first")
    kicked.host.sendto(b"direct", kicked.peer)
    kicked.run()
    assert len(rx.collect_used()) == 1
    device.ring_enable(RX, False)
    kicked.host.sendto(b"held", kicked.peer)
    kicked.run()
    assert rx.collect_used() == [] and len(device.network.frames_to_guest) == 1
    device.ring_enable(RX, True)
    kicked.run()
    assert len(rx.collect_used()) == 1 and not device.network.frames_to_guest
    seen = Seen()
    device.capture = seen  # type: ignore[assignment]
    kicked.host.sendto(b"captured", kicked.peer)
    kicked.run()
    assert len(rx.collect_used()) == 1 and seen.frames == 1  # (pushed, so captured)
