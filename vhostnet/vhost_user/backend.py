"""The back-end side of vhost-user: protocol state and replies, sans-IO.

``BackendHandler.handle(msg)`` takes one message from the front-end (QEMU) and
returns the replies to send, or ``CLOSE`` when the connection must end. It
keeps the protocol state (features, memory table, ring configuration) and
tells the device what changed through the ``BackendDevice`` callbacks. It
never raises for bad input: each kind of problem is logged once, counted in
``handler.counters`` and answered with a failure where a reply is due.

Who closes which fd:
  * memory-region fds (SET_MEM_TABLE, ADD_MEM_REG) and the log fd
    (SET_LOG_BASE) and the device-state fd (SET_DEVICE_STATE_FD) are handed
    to the device, which owns and closes them;
  * kick and call fds must be eventfds (anything else is refused before the
    device sees it: a file or pipe would spin or block the event loop) and are
    made non-blocking; they stay owned by the handler. The device only borrows
    kick/call fds: when one is replaced, the handler first tells the device
    the new one (or None), then closes the old one. ``close()`` closes all;
  * every other fd (duplicates, unexpected fds, fds of rejected messages) is
    closed by the handler before ``handle()`` returns.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from collections.abc import Callable
from typing import Literal

from vhostnet.vhost_user.codec import (
    U64,
    CodecError,
    DeviceStateParams,
    LogParams,
    MemoryTable,
    Message,
    SingleMemoryRegion,
    VringAddr,
    VringState,
    reply,
)
from vhostnet.vhost_user.connection import is_eventfd
from vhostnet.vhost_user.device_api import CLOSE, BackendDevice, Close, DeviceRefused, VringConfig
from vhostnet.vhost_user.protocol import (
    DEVICE_STATE_NOFD,
    NEVER_OFFERED_PROTOCOL_FEATURES,
    VRING_F_LOG,
    ProtocolFeature,
    Request,
    VirtioFeature,
)
from vhostnet.vhost_user.ratelimit import limiter, log_failure
from vhostnet.vhost_user.regions import AddResult, RegionTable, table_is_consistent

__all__ = ["CLOSE", "BackendDevice", "BackendHandler", "Close", "DeviceRefused", "VringConfig"]

log = logging.getLogger(__name__)

MAX_SPLIT_RING_SIZE = 32768
# Ring areas must be aligned as the virtio spec requires for split rings.
DESC_ALIGN, AVAIL_ALIGN, USED_ALIGN = 16, 2, 4
MIN_MTU, MAX_MTU = 68, 65535


class _Reject(Exception):
    """A request we refuse: counted under ``kind``, answered with failure."""

    def __init__(self, kind: str, text: str) -> None:
        super().__init__(text)
        self.kind = kind


class _CloseConnection(Exception):
    """A request that cannot be answered sensibly: the connection ends."""

    def __init__(self, kind: str, text: str) -> None:
        super().__init__(text)
        self.kind = kind


# A handler method returns an explicit reply body (bytes), or None for
# "done, no body" (REPLY_ACK then answers success when asked).
_Result = bytes | None

DEFAULT_PROTOCOL_FEATURES = (
    ProtocolFeature.MQ
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
    | ProtocolFeature.STATUS
    | ProtocolFeature.RESET_DEVICE
    | ProtocolFeature.NET_MTU
    | ProtocolFeature.RARP
)

# Requests whose reply is a u64 status even without REPLY_ACK, and what we
# answer when we refuse them.
_STATUS_REPLY_FAILURE = {
    Request.SET_DEVICE_STATE_FD: U64(DEVICE_STATE_NOFD | 1),
    Request.CHECK_DEVICE_STATE: U64(1),
    Request.IOTLB_MSG: U64(1),
    Request.POSTCOPY_END: U64(1),
}
# Requests that demand a structured reply we cannot give (their feature is
# never offered): a front-end sending them would wait forever, so we close.
_UNANSWERABLE = {
    Request.GET_CONFIG,
    Request.GET_INFLIGHT_FD,
    Request.POSTCOPY_ADVISE,
    Request.GET_SHARED_OBJECT,
    Request.CREATE_CRYPTO_SESSION,
}


class BackendHandler:
    """Protocol state machine of one vhost-user connection (back-end role)."""

    def __init__(
        self,
        device: BackendDevice,
        *,
        offer_log: bool = False,
        max_queue_pairs: int = 1,
        max_mem_slots: int = 32,
    ) -> None:
        if not 1 <= max_queue_pairs <= 128:
            raise ValueError("max_queue_pairs must be between 1 and 128")
        self.device = device
        self.offer_log = offer_log
        self.max_queue_pairs = max_queue_pairs
        self.max_mem_slots = max_mem_slots
        self.features = 0
        self.protocol_features = 0
        self.owner = False
        self.status = 0
        self.regions = RegionTable(max_mem_slots)
        self.rings = [VringConfig() for _ in range(2 * max_queue_pairs)]
        self.backend_req_fd: int | None = None
        self.counters: Counter[str] = Counter()

    # ------------------------------------------------------------------
    # Offers

    def offered_features(self) -> int:
        features = self.device.offered_features() | VirtioFeature.F_PROTOCOL_FEATURES
        if self.offer_log:
            features |= VirtioFeature.F_LOG_ALL
        return features

    def offered_protocol_features(self) -> int:
        features = DEFAULT_PROTOCOL_FEATURES
        if self.offer_log:
            features |= ProtocolFeature.LOG_SHMFD
        if self.device.supports_device_state():
            features |= ProtocolFeature.DEVICE_STATE
        return int(features & ~NEVER_OFFERED_PROTOCOL_FEATURES)

    def has_protocol_feature(self, feature: ProtocolFeature) -> bool:
        return bool(self.protocol_features & feature)

    # ------------------------------------------------------------------
    # Entry points

    def handle(self, msg: Message) -> list[Message] | Literal[Close.CLOSE]:
        """Process one message; return the replies to send, or CLOSE."""
        fds = list(msg.fds)
        body: _Result = None
        ok = True
        try:
            method = self._HANDLERS.get(msg.request)
            if method is not None:
                body = method(self, msg, fds)
            else:
                body = self._unsupported(msg)
        except CodecError as error:
            ok = self._refuse(msg, "malformed_payload", str(error))
        except (_Reject, DeviceRefused) as error:
            ok = self._refuse(msg, error.kind, str(error))
        except _CloseConnection as error:
            self._complain(error.kind, f"{_name(msg.request)}: {error}; closing connection")
            self._close_fds(fds)
            return CLOSE
        except Exception as error:  # a device bug must not kill the connection loop
            self.counters["device_error"] += 1
            log_failure(log, "vhost-user.device_error", "device failed on %s", _name(msg.request), error=error)
            ok = False
        if fds:
            # Fds of a refused message are expected casualties; extra fds on
            # an accepted one are the front-end's mistake and worth counting.
            if ok:
                self._complain("unexpected_fds", f"{_name(msg.request)} carried {len(fds)} extra fd(s)")
            self._close_fds(fds)
        return self._replies(msg, body, ok)

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

    def close(self) -> None:
        """The connection ended: stop rings, drop memory, close our fds."""
        for index, ring in enumerate(self.rings):
            try:
                if ring.started:
                    ring.base = self.device.ring_stop(index) & 0xFFFFFFFF
                    ring.started = False
                if ring.kick_fd is not None:
                    self.device.ring_kick_fd(index, None)
                if ring.call_fd is not None:
                    self.device.ring_call_fd(index, None)
            except Exception as error:
                log_failure(log, "vhost-user.device_error", "device failed while closing ring %d", index,
                            error=error)
            self._close_fds([fd for fd in (ring.kick_fd, ring.call_fd, ring.err_fd) if fd is not None])
            ring.kick_fd = ring.call_fd = ring.err_fd = None
            ring.kick_set = False
        for region in self.regions.clear():
            try:
                self.device.region_removed(region)
            except Exception as error:
                log_failure(log, "vhost-user.device_error", "device failed to remove a region", error=error)
        if self.backend_req_fd is not None:
            self._close_fds([self.backend_req_fd])
            self.backend_req_fd = None

    # ------------------------------------------------------------------
    # Replies, REPLY_ACK and complaints: decided here and nowhere else

    def _replies(self, msg: Message, body: _Result, ok: bool) -> list[Message]:
        if body is not None:
            return [reply(msg, body)]
        if not ok and msg.request in _STATUS_REPLY_FAILURE:
            return [reply(msg, _STATUS_REPLY_FAILURE[msg.request].emit())]
        if (
            not ok
            and msg.request == Request.SET_LOG_BASE
            and self.has_protocol_feature(ProtocolFeature.LOG_SHMFD)
        ):
            return [reply(msg, U64(1).emit())]
        if msg.need_reply and self.has_protocol_feature(ProtocolFeature.REPLY_ACK):
            return [reply(msg, U64(0 if ok else 1).emit())]
        return []

    def _refuse(self, msg: Message, kind: str, text: str) -> bool:
        self._complain(kind, f"{_name(msg.request)}: {text}")
        return False

    def _complain(self, kind: str, text: str) -> None:
        # Rate-limited per kind across all connections: a reconnecting fuzzer must not fill the log.
        self.counters[kind] += 1
        limiter.log(log, logging.WARNING, f"vhost-user.{kind}", "vhost-user: %s", text)

    @staticmethod
    def _close_fds(fds: list[int]) -> None:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        fds.clear()

    # ------------------------------------------------------------------
    # Helpers for the request methods

    def _ring(self, index: int) -> VringConfig:
        if not 0 <= index < len(self.rings):
            raise _Reject("bad_vring_index", f"ring {index} outside 0..{len(self.rings) - 1}")
        return self.rings[index]

    def _take_one_fd(self, fds: list[int], what: str) -> int:
        if not fds:
            raise _Reject("missing_fd", f"{what} needs an fd")
        return fds.pop(0)

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
    # Features and session

    def _get_features(self, msg: Message, fds: list[int]) -> _Result:
        return U64(self.offered_features()).emit()

    def _set_features(self, msg: Message, fds: list[int]) -> _Result:
        features = U64.parse(msg.payload).value
        unoffered = features & ~self.offered_features()
        if unoffered:
            raise _Reject("unoffered_features", f"acked features {unoffered:#x} never offered")
        self.features = features
        self.device.features_set(features)
        # Without F_PROTOCOL_FEATURES there is no SET_VRING_ENABLE: rings start enabled.
        if not features & VirtioFeature.F_PROTOCOL_FEATURES:
            self._enable_all_rings()
        return None

    def _get_protocol_features(self, msg: Message, fds: list[int]) -> _Result:
        return U64(self.offered_protocol_features()).emit()

    def _set_protocol_features(self, msg: Message, fds: list[int]) -> _Result:
        features = U64.parse(msg.payload).value
        unoffered = features & ~self.offered_protocol_features()
        if unoffered:
            raise _Reject("unoffered_features", f"acked protocol features {unoffered:#x} never offered")
        self.protocol_features = features
        return None

    def _set_owner(self, msg: Message, fds: list[int]) -> _Result:
        # QEMU sends this once per connection; a repeat is harmless.
        self.owner = True
        return None

    def _reset_owner(self, msg: Message, fds: list[int]) -> _Result:
        self.device.reset()
        self._reset_rings()
        self.owner = False
        return None

    def _reset_device(self, msg: Message, fds: list[int]) -> _Result:
        # Memory stays mapped: QEMU never resends its table after a reset.
        self.device.reset()
        self._reset_rings()
        return None

    def _get_queue_num(self, msg: Message, fds: list[int]) -> _Result:
        return U64(self.max_queue_pairs).emit()

    def _set_status(self, msg: Message, fds: list[int]) -> _Result:
        self.status = U64.parse(msg.payload).value & 0xFF
        self.device.set_status(self.status)
        return None

    def _get_status(self, msg: Message, fds: list[int]) -> _Result:
        return U64(self.status).emit()

    def _set_backend_req_fd(self, msg: Message, fds: list[int]) -> _Result:
        # We never send back-end requests, but keep the socket open so that the
        # front-end does not see its channel close under it.
        fd = self._take_one_fd(fds, "SET_BACKEND_REQ_FD")
        if self.backend_req_fd is not None:
            self._close_fds([self.backend_req_fd])
        self.backend_req_fd = fd
        return None

    # ------------------------------------------------------------------
    # Memory

    def _set_mem_table(self, msg: Message, fds: list[int]) -> _Result:
        table = MemoryTable.parse(msg.payload)
        if len(fds) != len(table.regions):
            raise _Reject("missing_fd", f"{len(table.regions)} regions but {len(fds)} fds")
        if not table_is_consistent(table.regions):
            raise _Reject("memory_overlap", "regions of the table overlap")
        # Regions present in both tables stay mapped; QEMU resends the table on every start.
        for old in self.regions:
            if old not in table.regions:
                self.regions.remove(old)
                self.device.region_removed(old)
        # Each fd stays in ``fds`` until the device takes it, so whatever fails
        # (this region or an earlier one), handle() closes every fd not taken.
        for region in table.regions:
            fd = fds.pop(0)
            if self.regions.check_add(region) is not AddResult.ADDED:
                self._close_fds([fd])
                continue
            self.device.region_added(region, fd)  # owns fd now, even when it raises
            self.regions.add(region)
        return None

    def _get_max_mem_slots(self, msg: Message, fds: list[int]) -> _Result:
        return U64(self.max_mem_slots).emit()

    def _add_mem_reg(self, msg: Message, fds: list[int]) -> _Result:
        region = SingleMemoryRegion.parse(msg.payload).region
        if len(fds) != 1:
            raise _Reject("missing_fd", f"ADD_MEM_REG needs exactly one fd, got {len(fds)}")
        result = self.regions.check_add(region)
        if result is AddResult.OVERLAP:
            raise _Reject("memory_overlap", f"region at gpa {region.guest_phys_addr:#x} overlaps")
        if result is AddResult.FULL:
            raise _Reject("memory_full", f"all {self.max_mem_slots} memory slots used")
        fd = fds.pop()
        if result is AddResult.DUPLICATE:
            self._close_fds([fd])  # the region is already mapped
            return None
        self.device.region_added(region, fd)  # owns fd now, even when it raises
        self.regions.add(region)
        return None

    def _rem_mem_reg(self, msg: Message, fds: list[int]) -> _Result:
        # The spec allows an fd here; it means nothing, close it quietly.
        self._close_fds(fds)
        region = SingleMemoryRegion.parse(msg.payload).region
        removed = self.regions.remove_matching(region)
        if removed is None:
            raise _Reject("unknown_region", f"no region at gpa {region.guest_phys_addr:#x}")
        self.device.region_removed(removed)
        return None

    def _set_log_base(self, msg: Message, fds: list[int]) -> _Result:
        if not self.has_protocol_feature(ProtocolFeature.LOG_SHMFD):
            raise _Reject("unsupported_request", "LOG_SHMFD not negotiated")
        params = LogParams.parse(msg.payload)
        fd = self._take_one_fd(fds, "SET_LOG_BASE")
        self.device.set_log_base(fd, params.mmap_size, params.mmap_offset)
        # With LOG_SHMFD the front-end blocks for this reply, REPLY_ACK or not.
        return U64(0).emit()

    def _set_log_fd(self, msg: Message, fds: list[int]) -> _Result:
        # An optional "log changed" eventfd; we log synchronously and need none.
        self._close_fds(fds)
        return None

    # ------------------------------------------------------------------
    # Rings

    def _set_vring_num(self, msg: Message, fds: list[int]) -> _Result:
        state = VringState.parse(msg.payload)
        ring = self._ring(state.index)
        if ring.started:
            raise _Reject("ring_busy", f"ring {state.index} is running")
        num = state.num
        if not 0 < num <= MAX_SPLIT_RING_SIZE or num & (num - 1):
            raise _Reject("bad_ring_size", f"ring size {num} is not a power of two <= 32768")
        ring.num = num
        self._start_if_ready(state.index, ring)
        return None

    def _set_vring_base(self, msg: Message, fds: list[int]) -> _Result:
        state = VringState.parse(msg.payload)
        ring = self._ring(state.index)
        if ring.started:
            raise _Reject("ring_busy", f"ring {state.index} is running")
        # Split rings use the low 16 bits; packed rings all 32: avail position and wrap
        # counter (bit 15) low, used position and wrap counter high (QEMU's encoding).
        ring.base = state.num & 0xFFFFFFFF
        return None

    def _set_vring_addr(self, msg: Message, fds: list[int]) -> _Result:
        addr = VringAddr.parse(msg.payload)
        ring = self._ring(addr.index)
        if addr.desc % DESC_ALIGN or addr.avail % AVAIL_ALIGN or addr.used % USED_ALIGN:
            raise _Reject("bad_ring_addr", f"ring {addr.index} areas are misaligned")
        log_on = bool(addr.flags & VRING_F_LOG)
        if ring.started:
            # Migration toggles logging on a running ring; moving it is not allowed.
            if (addr.desc, addr.avail, addr.used) != (ring.desc_uva, ring.avail_uva, ring.used_uva):
                raise _Reject("ring_busy", f"ring {addr.index} is running")
            ring.log, ring.log_guest_addr = log_on, addr.log_guest_addr
            self.device.ring_set_log(addr.index, log_on, addr.log_guest_addr)
            return None
        ring.desc_uva, ring.avail_uva, ring.used_uva = addr.desc, addr.avail, addr.used
        ring.log, ring.log_guest_addr = log_on, addr.log_guest_addr
        ring.addr_set = True
        self._start_if_ready(addr.index, ring)
        return None

    def _get_vring_base(self, msg: Message, fds: list[int]) -> _Result:
        state = VringState.parse(msg.payload)
        if not 0 <= state.index < len(self.rings):
            # QEMU expects a vring state back; a wrong one would corrupt its ring restore.
            raise _CloseConnection("bad_vring_index", f"GET_VRING_BASE for ring {state.index}")
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
                raise _Reject("bad_vring_fd", f"ring {value.vring_index}: the fd is not an eventfd")
            os.set_blocking(fds[0], False)
        return value.vring_index, ring, self._take_one_fd(fds, _name(msg.request))

    def _set_vring_kick(self, msg: Message, fds: list[int]) -> _Result:
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

    def _set_vring_call(self, msg: Message, fds: list[int]) -> _Result:
        index, ring, fd = self._vring_fd(msg, fds)
        old = ring.call_fd
        ring.call_fd = fd
        try:
            self.device.ring_call_fd(index, fd)
        finally:
            if old is not None:
                self._close_fds([old])
        return None

    def _set_vring_err(self, msg: Message, fds: list[int]) -> _Result:
        # Never written by us: any fd will do.
        _index, ring, fd = self._vring_fd(msg, fds, eventfd=False)
        if ring.err_fd is not None:
            self._close_fds([ring.err_fd])
        ring.err_fd = fd
        return None

    def _set_vring_enable(self, msg: Message, fds: list[int]) -> _Result:
        state = VringState.parse(msg.payload)
        ring = self._ring(state.index)
        if state.num not in (0, 1):
            raise _Reject("malformed_payload", f"enable value {state.num} is not 0 or 1")
        # Enabled is independent of started; QEMU sends this even before the ring exists.
        ring.enabled = bool(state.num)
        self.device.ring_enable(state.index, ring.enabled)
        return None

    # ------------------------------------------------------------------
    # Net specifics and migration

    def _send_rarp(self, msg: Message, fds: list[int]) -> _Result:
        mac = U64.parse(msg.payload).emit()[:6]
        self.device.send_rarp(mac)
        return None

    def _net_set_mtu(self, msg: Message, fds: list[int]) -> _Result:
        mtu = U64.parse(msg.payload).value
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise _Reject("bad_mtu", f"MTU {mtu} outside {MIN_MTU}..{MAX_MTU}")
        if not self.device.set_mtu(mtu):
            raise _Reject("bad_mtu", f"device refused MTU {mtu}")
        return None

    def _set_device_state_fd(self, msg: Message, fds: list[int]) -> _Result:
        if not self.has_protocol_feature(ProtocolFeature.DEVICE_STATE):
            raise _Reject("unsupported_request", "DEVICE_STATE not negotiated")
        params = DeviceStateParams.parse(msg.payload)
        fd = self._take_one_fd(fds, "SET_DEVICE_STATE_FD")
        if not self.device.device_state_fd(params.direction, params.phase, fd):
            raise _Reject("device_state", f"device refused transfer {params}")
        return U64(DEVICE_STATE_NOFD).emit()

    def _check_device_state(self, msg: Message, fds: list[int]) -> _Result:
        if not self.has_protocol_feature(ProtocolFeature.DEVICE_STATE):
            raise _Reject("unsupported_request", "DEVICE_STATE not negotiated")
        return U64(0 if self.device.check_device_state() else 1).emit()

    def _unsupported(self, msg: Message) -> _Result:
        if msg.request in _UNANSWERABLE:
            raise _CloseConnection("unsupported_request", "its feature was never offered")
        kind = "unsupported_request" if msg.request in Request._value2member_map_ else "unknown_request"
        raise _Reject(kind, "not supported")

    # By request id; plain functions, not bound methods, so that a handler is
    # not a reference cycle of its own (it must die with its connection).
    _HANDLERS: dict[int, Callable[[BackendHandler, Message, list[int]], _Result]] = {
        Request.GET_FEATURES: _get_features,
        Request.SET_FEATURES: _set_features,
        Request.GET_PROTOCOL_FEATURES: _get_protocol_features,
        Request.SET_PROTOCOL_FEATURES: _set_protocol_features,
        Request.SET_OWNER: _set_owner,
        Request.RESET_OWNER: _reset_owner,
        Request.RESET_DEVICE: _reset_device,
        Request.SET_MEM_TABLE: _set_mem_table,
        Request.GET_MAX_MEM_SLOTS: _get_max_mem_slots,
        Request.ADD_MEM_REG: _add_mem_reg,
        Request.REM_MEM_REG: _rem_mem_reg,
        Request.SET_VRING_NUM: _set_vring_num,
        Request.SET_VRING_BASE: _set_vring_base,
        Request.SET_VRING_ADDR: _set_vring_addr,
        Request.GET_VRING_BASE: _get_vring_base,
        Request.SET_VRING_KICK: _set_vring_kick,
        Request.SET_VRING_CALL: _set_vring_call,
        Request.SET_VRING_ERR: _set_vring_err,
        Request.SET_VRING_ENABLE: _set_vring_enable,
        Request.GET_QUEUE_NUM: _get_queue_num,
        Request.SET_LOG_BASE: _set_log_base,
        Request.SET_LOG_FD: _set_log_fd,
        Request.SEND_RARP: _send_rarp,
        Request.NET_SET_MTU: _net_set_mtu,
        Request.SET_STATUS: _set_status,
        Request.GET_STATUS: _get_status,
        Request.SET_BACKEND_REQ_FD: _set_backend_req_fd,
        Request.SET_DEVICE_STATE_FD: _set_device_state_fd,
        Request.CHECK_DEVICE_STATE: _check_device_state,
    }


def _name(request: int) -> str:
    try:
        return Request(request).name
    except ValueError:
        return f"request {request}"
