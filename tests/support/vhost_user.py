"""Support for the vhost-user tests: a BackendDevice that records every callback.

It does no packet work: it only keeps the fds it is given (closing what it
owns) and counts kicks on the kick eventfds; the handler starts its rings.
"""

from __future__ import annotations

import os
import threading
import time
from functools import partial

from vhostnet.vhost_user.backend import BackendHandler, VringConfig
from vhostnet.vhost_user.codec import MemoryRegion
from vhostnet.vhost_user.protocol import VirtioFeature

NET_FEATURES = (
    VirtioFeature.VERSION_1
    | VirtioFeature.NET_F_MRG_RXBUF
    | VirtioFeature.RING_F_EVENT_IDX
    | VirtioFeature.RING_F_INDIRECT_DESC
)


class RecordingDevice:
    def __init__(self, *, device_state: bool = False, stop_advance: int = 3) -> None:
        self.handler: BackendHandler | None = None
        self.calls: list[tuple] = []
        self.regions: dict[MemoryRegion, int] = {}
        self.kick_fds: dict[int, int] = {}
        self.call_fds: dict[int, int | None] = {}
        self.started: dict[int, VringConfig] = {}
        self.enabled: dict[int, bool] = {}
        self.kicks: dict[int, int] = {}
        self.device_state = device_state
        # ring_stop pretends the device consumed this many chains since start.
        self.stop_advance = stop_advance
        self.log_fd: int | None = None
        self.lock = threading.Lock()

    def _record(self, *call: object) -> None:
        with self.lock:
            self.calls.append(call)

    def names(self) -> list[str]:
        with self.lock:
            return [c[0] for c in self.calls]

    # --- BackendDevice -------------------------------------------------
    def offered_features(self) -> int:
        return NET_FEATURES

    def features_set(self, features: int) -> None:
        self._record("features_set", features)

    def region_added(self, region: MemoryRegion, fd: int) -> None:
        self._record("region_added", region)
        self.regions[region] = fd

    def region_removed(self, region: MemoryRegion) -> None:
        self._record("region_removed", region)
        os.close(self.regions.pop(region))

    def ring_kick_fd(self, index: int, fd: int | None) -> None:
        self._record("ring_kick_fd", index, fd)
        if fd is None:
            self.kick_fds.pop(index, None)
        else:
            self.kick_fds[index] = fd

    def ring_call_fd(self, index: int, fd: int | None) -> None:
        self._record("ring_call_fd", index, fd)
        self.call_fds[index] = fd

    def ring_start(self, index: int, ring: VringConfig) -> None:
        self._record("ring_start", index, ring)
        self.started[index] = ring

    def ring_stop(self, index: int) -> int:
        self._record("ring_stop", index)
        ring = self.started.pop(index)
        return (ring.base + self.stop_advance) & 0xFFFF

    def ring_enable(self, index: int, enabled: bool) -> None:
        self._record("ring_enable", index, enabled)
        self.enabled[index] = enabled

    def ring_set_log(self, index: int, log: bool, log_guest_addr: int) -> None:
        self._record("ring_set_log", index, log, log_guest_addr)

    def set_log_base(self, fd: int, size: int, offset: int) -> None:
        self._record("set_log_base", size, offset)
        if self.log_fd is not None:
            os.close(self.log_fd)
        self.log_fd = fd

    def set_mtu(self, mtu: int) -> bool:
        self._record("set_mtu", mtu)
        return mtu <= 9000

    def send_rarp(self, mac: bytes) -> None:
        self._record("send_rarp", mac)

    def reset(self) -> None:
        self._record("reset")
        self.started.clear()

    def set_status(self, status: int) -> None:
        self._record("set_status", status)

    def supports_device_state(self) -> bool:
        return self.device_state

    def device_state_fd(self, direction: int, phase: int, fd: int) -> bool:
        self._record("device_state_fd", direction, phase)
        os.close(fd)  # a real device would transfer its state after the reply
        return True

    def check_device_state(self) -> bool:
        self._record("check_device_state")
        return True

    # --- for ThreadedBackend ---------------------------------------------
    def watched_fds(self):
        return {fd: partial(self._kicked, index) for index, fd in self.kick_fds.items()}

    def _kicked(self, index: int) -> None:
        try:
            os.eventfd_read(self.kick_fds[index])
        except (BlockingIOError, KeyError):
            return
        self.kicks[index] = self.kicks.get(index, 0) + 1

    def close(self) -> None:
        for fd in self.regions.values():
            os.close(fd)
        self.regions.clear()
        if self.log_fd is not None:
            os.close(self.log_fd)
            self.log_fd = None


def wait_until(condition, timeout: float = 5.0) -> bool:
    """Poll ``condition`` until it is true or ``timeout`` passes (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))
