"""Types shared by the back-end handler and the device that implements it.

``VringConfig`` is what the handler knows about a ring; ``BackendDevice`` is the
set of callbacks the device provides (docs/ARCHITECTURE.md, section 1).
Re-exported by backend.py, which is where callers import them from.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from vhostnet.vhost_user.codec import MemoryRegion


class Close(Enum):
    CLOSE = "close"


CLOSE = Close.CLOSE
"""Returned by ``handle()`` when the server must close the connection."""


class DeviceRefused(Exception):
    """Raised by a device callback for front-end input it cannot use (a region its
    file cannot back, a kick fd that is no eventfd): the handler refuses the
    request (logged once, counted under ``kind``), unlike a device bug."""

    def __init__(self, kind: str, text: str) -> None:
        super().__init__(text)
        self.kind = kind


@dataclass
class VringConfig:
    """Everything the front-end told us about one ring.

    ``base`` is the next avail index (split ring: low 16 bits of SET_VRING_BASE).
    ``kick_set`` is True once SET_VRING_KICK arrived since the last stop (with
    an fd or with NOFD); a ring is startable when it has num, addr and kick.
    """

    num: int = 0
    base: int = 0
    desc_uva: int = 0
    avail_uva: int = 0
    used_uva: int = 0
    log_guest_addr: int = 0
    log: bool = False
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    enabled: bool = False
    started: bool = False
    addr_set: bool = False
    kick_set: bool = False

    @property
    def startable(self) -> bool:
        return self.num > 0 and self.addr_set and self.kick_set and not self.started


class BackendDevice(Protocol):
    """What the device implements; the handler calls these on protocol events."""

    def offered_features(self) -> int: ...  # virtio feature bits to offer
    def features_set(self, features: int) -> None: ...  # SET_FEATURES (acked)
    def region_added(self, region: MemoryRegion, fd: int) -> None: ...  # device owns fd
    def region_removed(self, region: MemoryRegion) -> None: ...
    def ring_kick_fd(self, index: int, fd: int | None) -> None: ...  # borrowed; poll it
    def ring_call_fd(self, index: int, fd: int | None) -> None: ...  # borrowed
    # The ring has num, addr and its kick fd (told just before): the device runs it now.
    def ring_start(self, index: int, ring: VringConfig) -> None: ...
    def ring_stop(self, index: int) -> int: ...  # GET_VRING_BASE: stop, return next avail idx
    def ring_enable(self, index: int, enabled: bool) -> None: ...
    # SET_VRING_ADDR on a started ring (migration turns used-ring logging on/off).
    def ring_set_log(self, index: int, log: bool, log_guest_addr: int) -> None: ...
    def set_log_base(self, fd: int, size: int, offset: int) -> None: ...  # device owns fd
    def set_mtu(self, mtu: int) -> bool: ...
    def send_rarp(self, mac: bytes) -> None: ...
    def reset(self) -> None: ...  # RESET_DEVICE/RESET_OWNER: rings off, memory kept
    def set_status(self, status: int) -> None: ...
    def supports_device_state(self) -> bool: ...  # offer DEVICE_STATE (bit 19)?
    # The device owns fd and must do the transfer only after the reply is sent
    # (QEMU blocks on the pipe right after reading it): schedule it, don't do it here.
    def device_state_fd(self, direction: int, phase: int, fd: int) -> bool: ...
    def check_device_state(self) -> bool: ...
