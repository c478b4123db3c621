"""The ring requests of the back-end: SET_VRING_NUM/BASE/ADDR/KICK/CALL/ERR/ENABLE and
GET_VRING_BASE, and when a ring starts (a part of ``BackendHandler``).

Kick and call fds must be eventfds, made non-blocking, and stay owned by the
handler: the device only borrows them (told the new one before the old closes).
"""

from __future__ import annotations

import dataclasses
import logging
import os

from vhostnet.vhost_user.codec import U64, Message, VringAddr, VringState
from vhostnet.vhost_user.connection import is_eventfd
from vhostnet.vhost_user.device_api import VringConfig
from vhostnet.vhost_user.protocol import VRING_F_LOG
from vhostnet.vhost_user.ratelimit import log_failure
from vhostnet.vhost_user.request_state import (
    CloseConnection,
    Reject,
    RequestState,
    Result,
    request_name,
)

log = logging.getLogger(__name__)

MAX_SPLIT_RING_SIZE = 32768
# Ring areas must be aligned as the virtio spec requires for split rings.
DESC_ALIGN, AVAIL_ALIGN, USED_ALIGN = 16, 2, 4


class RingRequests(RequestState):
    """Ring configuration, start, stop and the kick/call/err fds."""

    def _start_if_ready(self, index: int, ring: VringConfig) -> None:
        """Start the ring once it has num, addr and its kick fd (as passt and libvhost-user
        do on SET_VRING_KICK): the device gets ``ring_start`` with a copy of its config.

        A kick that reached the back-end before (a migration source, or this one
        before a stop) is lost, and the guest may never kick again (EVENT_IDX), so
        waiting for a kick could leave frames queued forever.
        """
        if not ring.startable:
            return
        ring.started = True
        try:
            self.device.ring_start(index, dataclasses.replace(ring))
        except Exception as error:
            log_failure(log, "vhost-user.device_error", "device failed to start ring %d", index, error=error)
            self.counters["device_error"] += 1
            ring.started = False

    def _ring(self, index: int) -> VringConfig:
        if not 0 <= index < len(self.rings):
            raise Reject("bad_vring_index", f"ring {index} outside 0..{len(self.rings) - 1}")
        return self.rings[index]

    def _enable_all_rings(self) -> None:
        for index, ring in enumerate(self.rings):
            if not ring.enabled:
                ring.enabled = True
                self.device.ring_enable(index, True)

    def _forget_kick(self, index: int, ring: VringConfig) -> None:
        """A stopped/reset ring needs a fresh SET_VRING_KICK before it may start again."""
        if ring.kick_fd is not None:
            self.device.ring_kick_fd(index, None)
            self._close_fds([ring.kick_fd])
            ring.kick_fd = None
        ring.kick_set = False

    def _reset_rings(self) -> None:
        """RESET_DEVICE/RESET_OWNER: every ring stopped, disabled, to be set up again.

        Call and err fds are kept: QEMU does not resend the err fd after a reset.
        """
        for index, ring in enumerate(self.rings):
            self._forget_kick(index, ring)
            ring.started = False
            ring.enabled = False
            ring.num = ring.base = 0
            ring.addr_set = False
        self.status = 0

    # ------------------------------------------------------------------
    # Requests


    def _set_vring_num(self, msg: Message, fds: list[int]) -> Result:
        state = VringState.parse(msg.payload)
        ring = self._ring(state.index)
        if ring.started:
            raise Reject("ring_busy", f"ring {state.index} is running")
        num = state.num
        if not 0 < num <= MAX_SPLIT_RING_SIZE or num & (num - 1):
            raise Reject("bad_ring_size", f"ring size {num} is not a power of two <= 32768")
        ring.num = num
        self._start_if_ready(state.index, ring)
        return None

    def _set_vring_base(self, msg: Message, fds: list[int]) -> Result:
        state = VringState.parse(msg.payload)
        ring = self._ring(state.index)
        if ring.started:
            raise Reject("ring_busy", f"ring {state.index} is running")
        # Split rings use the low 16 bits; packed rings all 32: avail position and wrap
        # counter (bit 15) low, used position and wrap counter high (QEMU's encoding).
        ring.base = state.num & 0xFFFFFFFF
        return None

    def _set_vring_addr(self, msg: Message, fds: list[int]) -> Result:
        addr = VringAddr.parse(msg.payload)
        ring = self._ring(addr.index)
        if addr.desc % DESC_ALIGN or addr.avail % AVAIL_ALIGN or addr.used % USED_ALIGN:
            raise Reject("bad_ring_addr", f"ring {addr.index} areas are misaligned")
        log_on = bool(addr.flags & VRING_F_LOG)
        if ring.started:
            # Migration toggles logging on a running ring; moving it is not allowed.
            if (addr.desc, addr.avail, addr.used) != (ring.desc_uva, ring.avail_uva, ring.used_uva):
                raise Reject("ring_busy", f"ring {addr.index} is running")
            ring.log, ring.log_guest_addr = log_on, addr.log_guest_addr
            self.device.ring_set_log(addr.index, log_on, addr.log_guest_addr)
            return None
        ring.desc_uva, ring.avail_uva, ring.used_uva = addr.desc, addr.avail, addr.used
        ring.log, ring.log_guest_addr = log_on, addr.log_guest_addr
        ring.addr_set = True
        self._start_if_ready(addr.index, ring)
        return None

    def _get_vring_base(self, msg: Message, fds: list[int]) -> Result:
        state = VringState.parse(msg.payload)
        if not 0 <= state.index < len(self.rings):
            # QEMU expects a vring state back; a wrong one would corrupt its ring restore.
            raise CloseConnection("bad_vring_index", f"GET_VRING_BASE for ring {state.index}")
        ring = self.rings[state.index]
        if ring.started:
            ring.started = False
            ring.base = self.device.ring_stop(state.index) & 0xFFFFFFFF
        self._forget_kick(state.index, ring)
        return VringState(state.index, ring.base).emit()

    def _vring_fd(self, msg: Message, fds: list[int], *, eventfd: bool = True
                  ) -> tuple[int, VringConfig, int | None]:
        """Common part of SET_VRING_KICK/CALL/ERR: (index, ring, fd or None for NOFD).

        With ``eventfd`` the fd must be an eventfd; it is made non-blocking (an
        interrupt must never stall the event loop) before the handler takes it.
        """
        value = U64.parse(msg.payload)
        ring = self._ring(value.vring_index)
        if value.vring_nofd:
            return value.vring_index, ring, None  # a stray fd is closed by handle()
        if eventfd and fds:
            if not is_eventfd(fds[0]):
                raise Reject("bad_vring_fd", f"ring {value.vring_index}: the fd is not an eventfd")
            os.set_blocking(fds[0], False)
        return value.vring_index, ring, self._take_one_fd(fds, request_name(msg.request))

    def _set_vring_kick(self, msg: Message, fds: list[int]) -> Result:
        index, ring, fd = self._vring_fd(msg, fds)
        old = ring.kick_fd
        ring.kick_fd, ring.kick_set = fd, True
        try:
            self.device.ring_kick_fd(index, fd)
        finally:
            # The device dropped the old fd first, whatever it then made of the new one.
            if old is not None:
                self._close_fds([old])
        self._start_if_ready(index, ring)
        return None

    def _set_vring_call(self, msg: Message, fds: list[int]) -> Result:
        index, ring, fd = self._vring_fd(msg, fds)
        old = ring.call_fd
        ring.call_fd = fd
        try:
            self.device.ring_call_fd(index, fd)
        finally:
            if old is not None:
                self._close_fds([old])
        return None

    def _set_vring_err(self, msg: Message, fds: list[int]) -> Result:
        # Never written by us: any fd will do.
        _index, ring, fd = self._vring_fd(msg, fds, eventfd=False)
        if ring.err_fd is not None:
            self._close_fds([ring.err_fd])
        ring.err_fd = fd
        return None

    def _set_vring_enable(self, msg: Message, fds: list[int]) -> Result:
        state = VringState.parse(msg.payload)
        ring = self._ring(state.index)
        if state.num not in (0, 1):
            raise Reject("malformed_payload", f"enable value {state.num} is not 0 or 1")
        # Enabled is independent of started; QEMU sends this even before the ring exists.
        ring.enabled = bool(state.num)
        self.device.ring_enable(state.index, ring.enabled)
        return None
