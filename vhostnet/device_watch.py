"""The notification watchdog: kicks and interrupts lost to a guest's memory ordering.

Theory of operation
-------------------
Kicks and interrupts are suppressed by a handshake over shared memory. With EVENT_IDX the
guest stores avail->idx, issues a full barrier and reads our avail_event; we store
avail_event, issue a full barrier and read avail->idx again (``Virtqueue.enable_kick``). With
both barriers one side always sees the other: either the guest kicks or we drain. Interrupts
work the same way with used->idx and the guest's used_event (or, without EVENT_IDX, the
flags).

A guest whose barriers never reach the host CPU breaks that. QEMU before 8.1 under TCG with a
single vCPU translates the guest's fences into nothing (QEMU commit "tcg: Do not elide memory
barriers for !CF_PARALLEL in system mode", June 2023, fixed it). The host CPU may then let
the guest's load of avail_event pass its own store of avail->idx while we do the mirror
image. Neither sees the other: the guest does not kick, we do not drain, and the TX ring
holds frames that nobody announces until the guest happens to kick again, which a
TCP sender that is waiting for its ACKs never does. In the e2e suite a guest's upload
stalled this way under QEMU 7.2, with 10 chains waiting behind an armed avail_event; its ARP
requests then queued behind them. The same race on used_event loses an interrupt.

The race can only happen while we are touching the ring, so the watchdog runs only while
the rings are busy. A kick or a push into an RX ring arms it. Every ``WATCH_PERIOD`` it
looks at each ring with one C call (``Virtqueue.watch``), and on each look:
- it drains a TX ring that did not move during the last period but holds chains that no
  kick announced;
- it raises the interrupt a guest asks for but did not get;
- it offers waiting frames to the RX rings again (an RX kick can be lost the same way).

It stops after ``WATCH_IDLE_LOOKS`` looks in which no ring moved. The cost is one timer
callback per period while traffic flows, and nothing when the device is idle. A lost kick
costs the guest at most two periods, not a stall. Each kind of find is counted
(``device.watch.lost_kicks``, ``device.watch.lost_interrupts``) and logged once per device.
"""

from __future__ import annotations

import asyncio
import logging

from vhostnet.device_rx import is_rx_ring
from vhostnet.virtqueue import WATCH_MOVED, WATCH_RESIGNALLED, WATCH_TX_WAITING, Virtqueue

log = logging.getLogger("vhostnet.device")

WATCH_PERIOD = 0.010     # seconds between two looks at the rings while they are busy
WATCH_IDLE_LOOKS = 100   # looks without any ring moving before the watchdog stops (1 s)


class RingWatchdog:
    """NetDevice's watchdog half (see the module docstring); its state is its own."""

    loop: asyncio.AbstractEventLoop
    queues: dict[int, Virtqueue]
    counters: dict[str, int]
    _closed: bool
    _watch_timer: asyncio.TimerHandle | None
    _watch_idle_looks: int
    _watch_logged: set[str]

    def _init_watchdog(self) -> None:
        self._watch_timer = None
        self._watch_idle_looks = 0
        self._watch_logged = set()
        self.counters["watch.lost_kicks"] = 0
        self.counters["watch.lost_interrupts"] = 0

    def _drain_tx(self, index: int) -> None:
        raise NotImplementedError  # NetDevice's

    def _watching(self, on: bool) -> None:
        raise NotImplementedError  # NetDevice's: the C readers learn it

    def _flush_rx_if_waiting(self) -> None:
        raise NotImplementedError  # NetDevice's

    def _rings_busy(self) -> None:
        """A ring was kicked or written: watch the rings from now on if not already."""
        if self._watch_timer is None and not self._closed:
            self._watch_idle_looks = 0
            self._watch_timer = self.loop.call_later(WATCH_PERIOD, self._watch_rings)
            self._watching(True)

    def _stop_watchdog(self) -> None:
        if self._watch_timer is not None:
            self._watch_timer.cancel()
            self._watch_timer = None
            self._watching(False)

    def _watch_rings(self) -> None:
        # ``_watch_timer`` stays set during the look: a push it makes (``_flush_rx_if_waiting``)
        # calls ``_rings_busy``, which must not start a second chain of looks beside this one
        # (each such look doubled the chains). Whatever the look raises, the chain goes on or
        # ends here, so a later kick can start the watchdog again.
        moved = False
        try:
            if not self._closed:
                moved = self._look_at_rings()
        finally:
            self._watch_idle_looks = 0 if moved else self._watch_idle_looks + 1
            if self._watch_idle_looks < WATCH_IDLE_LOOKS and not self._closed:
                self._watch_timer = self.loop.call_later(WATCH_PERIOD, self._watch_rings)
            else:
                self._watch_timer = None
                self._watching(False)

    def _look_at_rings(self) -> bool:
        """One look at each ring (see the module docstring); whether any ring moved."""
        moved = False
        for index, queue in list(self.queues.items()):
            if queue.broken:
                continue
            seen = queue.watch(not is_rx_ring(index))
            if seen & WATCH_MOVED:
                moved = True
            if seen & WATCH_RESIGNALLED:
                self._watch_found("lost_interrupts", index, "an interrupt the guest asked for")
            if seen & WATCH_TX_WAITING:
                self._watch_found("lost_kicks", index, "a kick for new TX frames")
                self._drain_tx(index)
        self._flush_rx_if_waiting()
        return moved

    def _watch_found(self, counter: str, index: int, what: str) -> None:
        self.counters[f"watch.{counter}"] += 1
        if counter not in self._watch_logged:
            self._watch_logged.add(counter)
            log.info("ring %d: %s was lost, recovered by the watchdog (the guest's memory "
                     "barriers do not reach vhostnet, as with QEMU before 8.1 under TCG with "
                     "one vCPU); logged once, counted in device.watch.%s", index, what, counter)
