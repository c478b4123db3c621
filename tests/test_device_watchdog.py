"""The notification watchdog (vhostnet/device_watch.py) recovers a kick or an interrupt
that a guest's missing memory barrier lost, on a real vhostnet process.

The lost kick: the guest published a TX chain but read a stale avail_event and did not
kick (``send_frame(kick=False)``); before the watchdog that frame, and every one queued
behind it, waited until the guest's next kick, which a TCP sender waiting for ACKs never
sends (QEMU 7.2, TCG, one vCPU: tests/e2e/test_nat_services.py stalled that way). The lost
interrupt: vhostnet read the guest's "no interrupt" before the guest's "interrupt at this
chain" landed; the guest then sleeps on a chain already used.

Split rings with EVENT_IDX and without it (the flags), and packed rings."""

from __future__ import annotations

import os
import select
import time

import pytest

from testkit.frontend import DRIVER_FEATURES, Frontend
from tests.support.daemon import VhostnetProcess, gateway_mac
from tests.support.frames import GATEWAY_IP, arp_request
from vhostnet.vhost_user.protocol import VirtioFeature

RING_KINDS = {
    "split": {},
    "split-flags": {"features": DRIVER_FEATURES & ~VirtioFeature.RING_F_EVENT_IDX},
    "packed": {"packed": True},
}


def _arp_replies(frames: list[bytes]) -> list[bytes]:
    return [f for f in frames if f[12:14] == b"\x08\x06" and f[20:22] == b"\x00\x02"]


def _wait_arp_reply(frontend: Frontend, seconds: float) -> list[bytes]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        replies = _arp_replies(frontend.receive_frames(timeout=0.05))
        if replies:
            return replies
    return []


@pytest.mark.parametrize("kind", list(RING_KINDS))
def test_a_lost_tx_kick_is_drained_by_the_watchdog(server: VhostnetProcess, kind: str) -> None:
    with Frontend(server.socket_path, **RING_KINDS[kind]) as frontend:
        frontend.connect()
        frontend.start()
        assert frontend.packed == (kind == "packed")
        gateway_mac(frontend)  # (a kick and an RX push: the rings are busy)
        assert server.stats()["device.watch.lost_kicks"] == 0
        frontend.send_frame(arp_request(GATEWAY_IP), kick=False)
        replies = _wait_arp_reply(frontend, 5.0)
        assert len(replies) == 1, "the unannounced TX frame was never taken"
        assert server.stats()["device.watch.lost_kicks"] == 1
        # Kicks still work as before afterwards, and the watchdog found nothing more.
        frontend.send_frame(arp_request(GATEWAY_IP))
        assert len(_wait_arp_reply(frontend, 5.0)) == 1
        assert server.stats()["device.watch.lost_kicks"] == 1
    assert "was lost, recovered by the watchdog" in server.log_path.read_text()


def _call_pending(fd: int, timeout: float) -> bool:
    ready, _, _ = select.select([fd], [], [], timeout)
    if ready:
        os.eventfd_read(fd)
    return bool(ready)


@pytest.mark.parametrize("kind", list(RING_KINDS))
def test_a_lost_rx_interrupt_is_raised_by_the_watchdog(server: VhostnetProcess,
                                                       kind: str) -> None:
    with Frontend(server.socket_path, **RING_KINDS[kind]) as frontend:
        frontend.connect()
        frontend.start()
        gateway_mac(frontend)
        rx, call_fd = frontend.rings[0], frontend.call_fds[0]
        frontend.receive_frames(timeout=0.1)  # (anything else the start brought)
        reply_at = rx.used_seen
        rx.quiet()  # "no interrupt": what vhostnet reads while it publishes the reply
        _call_pending(call_fd, 0)
        frontend.send_frame(arp_request(GATEWAY_IP))
        deadline = time.monotonic() + 5
        while not rx.has_used() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert rx.has_used(), "no reply"
        assert not _call_pending(call_fd, 0.05), "the guest asked for no interrupt"
        # The guest's "interrupt at the reply's chain" lands late: nobody tells it otherwise.
        rx.arm(reply_at)
        assert _call_pending(call_fd, 5.0), "the interrupt the guest waits for never came"
        assert server.stats()["device.watch.lost_interrupts"] == 1
        assert len(_arp_replies(frontend.receive_frames(timeout=1))) == 1


def test_a_look_that_pushes_frames_keeps_one_chain_of_looks() -> None:
    """A look offers waiting frames to the RX rings (``_flush_rx_if_waiting``), and a push into
    an RX ring arms the watchdog (``_rings_busy``): that must not start a second chain of
    looks beside the running one (each such look doubled them: thousands of looks a second
    on a busy device instead of one per WATCH_PERIOD)."""
    import asyncio

    from vhostnet.device_watch import WATCH_PERIOD, RingWatchdog

    class Device(RingWatchdog):
        def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
            self.loop, self.queues, self.counters, self._closed = loop, {}, {}, False
            self._init_watchdog()
            self.looks = 0

        def _flush_rx_if_waiting(self) -> None:
            self.looks += 1
            if self.looks <= 6:  # frames waited for the first looks: each push arms the watchdog
                self._rings_busy()

        def _watching(self, on: bool) -> None:
            self.watching = on

    loop = asyncio.new_event_loop()
    try:
        device = Device(loop)
        device._rings_busy()
        loop.run_until_complete(asyncio.sleep(WATCH_PERIOD * 12.5))
        assert 8 <= device.looks <= 13  # one look per period
        assert device.watching
        device._stop_watchdog()
        assert not device.watching
    finally:
        loop.close()
