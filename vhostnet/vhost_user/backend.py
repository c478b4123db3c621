"""The back-end side of vhost-user: protocol state and replies, sans-IO.

``BackendHandler.handle(msg)`` takes one message from the front-end (QEMU) and
returns the replies to send, or ``CLOSE`` when the connection must end. It
keeps the protocol state (features, memory table, ring configuration) and
tells the device what changed through the ``BackendDevice`` callbacks. It
never raises for bad input: each kind of problem is logged once, counted in
``handler.counters`` and answered with a failure where a reply is due.

This module holds the handler itself (state, ``handle``, replies, ``close``), the
feature/session/net/migration requests and the request table; the memory and log
requests are in memory_requests.py, the ring requests in ring_requests.py, what they
share (state declaration, ``Reject``, fd helpers) in request_state.py.

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

import logging
from collections import Counter
from collections.abc import Callable
from typing import Literal

from vhostnet.vhost_user.codec import U64, CodecError, DeviceStateParams, Message, reply
from vhostnet.vhost_user.device_api import CLOSE, BackendDevice, Close, DeviceRefused, VringConfig
from vhostnet.vhost_user.memory_requests import MemoryRequests
from vhostnet.vhost_user.protocol import (
    DEVICE_STATE_NOFD,
    NEVER_OFFERED_PROTOCOL_FEATURES,
    ProtocolFeature,
    Request,
    VirtioFeature,
)
from vhostnet.vhost_user.ratelimit import limiter, log_failure
from vhostnet.vhost_user.regions import RegionTable
from vhostnet.vhost_user.request_state import CloseConnection, Reject, Result, request_name
from vhostnet.vhost_user.ring_requests import RingRequests

__all__ = ["CLOSE", "BackendDevice", "BackendHandler", "Close", "DeviceRefused", "VringConfig"]

log = logging.getLogger(__name__)

MIN_MTU, MAX_MTU = 68, 65535


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


class BackendHandler(MemoryRequests, RingRequests):
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

    # ------------------------------------------------------------------
    # Entry points

    def handle(self, msg: Message) -> list[Message] | Literal[Close.CLOSE]:
        """Process one message; return the replies to send, or CLOSE."""
        fds = list(msg.fds)
        body: Result = None
        ok = True
        try:
            method = self._HANDLERS.get(msg.request)
            if method is not None:
                body = method(self, msg, fds)
            else:
                body = self._unsupported(msg)
        except CodecError as error:
            ok = self._refuse(msg, "malformed_payload", str(error))
        except (Reject, DeviceRefused) as error:
            ok = self._refuse(msg, error.kind, str(error))
        except CloseConnection as error:
            self._complain(error.kind, f"{request_name(msg.request)}: {error}; closing connection")
            self._close_fds(fds)
            return CLOSE
        except Exception as error:  # a device bug must not kill the connection loop
            self.counters["device_error"] += 1
            log_failure(log, "vhost-user.device_error", "device failed on %s", request_name(msg.request), error=error)
            ok = False
        if fds:
            # Fds of a refused message are expected casualties; extra fds on
            # an accepted one are the front-end's mistake and worth counting.
            if ok:
                self._complain("unexpected_fds", f"{request_name(msg.request)} carried {len(fds)} extra fd(s)")
            self._close_fds(fds)
        return self._replies(msg, body, ok)

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

    def _replies(self, msg: Message, body: Result, ok: bool) -> list[Message]:
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
        self._complain(kind, f"{request_name(msg.request)}: {text}")
        return False

    def _complain(self, kind: str, text: str) -> None:
        # Rate-limited per kind across all connections: a reconnecting fuzzer must not fill the log.
        self.counters[kind] += 1
        limiter.log(log, logging.WARNING, f"vhost-user.{kind}", "vhost-user: %s", text)

    # ------------------------------------------------------------------
    # Features and session

    def _get_features(self, msg: Message, fds: list[int]) -> Result:
        return U64(self.offered_features()).emit()

    def _set_features(self, msg: Message, fds: list[int]) -> Result:
        features = U64.parse(msg.payload).value
        unoffered = features & ~self.offered_features()
        if unoffered:
            raise Reject("unoffered_features", f"acked features {unoffered:#x} never offered")
        self.features = features
        self.device.features_set(features)
        # Without F_PROTOCOL_FEATURES there is no SET_VRING_ENABLE: rings start enabled.
        if not features & VirtioFeature.F_PROTOCOL_FEATURES:
            self._enable_all_rings()
        return None

    def _get_protocol_features(self, msg: Message, fds: list[int]) -> Result:
        return U64(self.offered_protocol_features()).emit()

    def _set_protocol_features(self, msg: Message, fds: list[int]) -> Result:
        features = U64.parse(msg.payload).value
        unoffered = features & ~self.offered_protocol_features()
        if unoffered:
            raise Reject("unoffered_features", f"acked protocol features {unoffered:#x} never offered")
        self.protocol_features = features
        return None

    def _set_owner(self, msg: Message, fds: list[int]) -> Result:
        # QEMU sends this once per connection; a repeat is harmless.
        self.owner = True
        return None

    def _reset_owner(self, msg: Message, fds: list[int]) -> Result:
        self.device.reset()
        self._reset_rings()
        self.owner = False
        return None

    def _reset_device(self, msg: Message, fds: list[int]) -> Result:
        # Memory stays mapped: QEMU never resends its table after a reset.
        self.device.reset()
        self._reset_rings()
        return None

    def _get_queue_num(self, msg: Message, fds: list[int]) -> Result:
        return U64(self.max_queue_pairs).emit()

    def _set_status(self, msg: Message, fds: list[int]) -> Result:
        self.status = U64.parse(msg.payload).value & 0xFF
        self.device.set_status(self.status)
        return None

    def _get_status(self, msg: Message, fds: list[int]) -> Result:
        return U64(self.status).emit()

    def _set_backend_req_fd(self, msg: Message, fds: list[int]) -> Result:
        # We never send back-end requests, but keep the socket open so that the
        # front-end does not see its channel close under it.
        fd = self._take_one_fd(fds, "SET_BACKEND_REQ_FD")
        if self.backend_req_fd is not None:
            self._close_fds([self.backend_req_fd])
        self.backend_req_fd = fd
        return None

    # ------------------------------------------------------------------
    # Net specifics and migration

    def _send_rarp(self, msg: Message, fds: list[int]) -> Result:
        mac = U64.parse(msg.payload).emit()[:6]
        self.device.send_rarp(mac)
        return None

    def _net_set_mtu(self, msg: Message, fds: list[int]) -> Result:
        mtu = U64.parse(msg.payload).value
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise Reject("bad_mtu", f"MTU {mtu} outside {MIN_MTU}..{MAX_MTU}")
        if not self.device.set_mtu(mtu):
            raise Reject("bad_mtu", f"device refused MTU {mtu}")
        return None

    def _set_device_state_fd(self, msg: Message, fds: list[int]) -> Result:
        if not self.has_protocol_feature(ProtocolFeature.DEVICE_STATE):
            raise Reject("unsupported_request", "DEVICE_STATE not negotiated")
        params = DeviceStateParams.parse(msg.payload)
        fd = self._take_one_fd(fds, "SET_DEVICE_STATE_FD")
        if not self.device.device_state_fd(params.direction, params.phase, fd):
            raise Reject("device_state", f"device refused transfer {params}")
        return U64(DEVICE_STATE_NOFD).emit()

    def _check_device_state(self, msg: Message, fds: list[int]) -> Result:
        if not self.has_protocol_feature(ProtocolFeature.DEVICE_STATE):
            raise Reject("unsupported_request", "DEVICE_STATE not negotiated")
        return U64(0 if self.device.check_device_state() else 1).emit()

    def _unsupported(self, msg: Message) -> Result:
        if msg.request in _UNANSWERABLE:
            raise CloseConnection("unsupported_request", "its feature was never offered")
        kind = "unsupported_request" if msg.request in Request._value2member_map_ else "unknown_request"
        raise Reject(kind, "not supported")

    # By request id; plain functions, not bound methods, so that a handler is
    # not a reference cycle of its own (it must die with its connection).
    _HANDLERS: dict[int, Callable[[BackendHandler, Message, list[int]], Result]] = {
        Request.GET_FEATURES: _get_features,
        Request.SET_FEATURES: _set_features,
        Request.GET_PROTOCOL_FEATURES: _get_protocol_features,
        Request.SET_PROTOCOL_FEATURES: _set_protocol_features,
        Request.SET_OWNER: _set_owner,
        Request.RESET_OWNER: _reset_owner,
        Request.RESET_DEVICE: _reset_device,
        Request.SET_MEM_TABLE: MemoryRequests._set_mem_table,
        Request.GET_MAX_MEM_SLOTS: MemoryRequests._get_max_mem_slots,
        Request.ADD_MEM_REG: MemoryRequests._add_mem_reg,
        Request.REM_MEM_REG: MemoryRequests._rem_mem_reg,
        Request.SET_VRING_NUM: RingRequests._set_vring_num,
        Request.SET_VRING_BASE: RingRequests._set_vring_base,
        Request.SET_VRING_ADDR: RingRequests._set_vring_addr,
        Request.GET_VRING_BASE: RingRequests._get_vring_base,
        Request.SET_VRING_KICK: RingRequests._set_vring_kick,
        Request.SET_VRING_CALL: RingRequests._set_vring_call,
        Request.SET_VRING_ERR: RingRequests._set_vring_err,
        Request.SET_VRING_ENABLE: RingRequests._set_vring_enable,
        Request.GET_QUEUE_NUM: _get_queue_num,
        Request.SET_LOG_BASE: MemoryRequests._set_log_base,
        Request.SET_LOG_FD: MemoryRequests._set_log_fd,
        Request.SEND_RARP: _send_rarp,
        Request.NET_SET_MTU: _net_set_mtu,
        Request.SET_STATUS: _set_status,
        Request.GET_STATUS: _get_status,
        Request.SET_BACKEND_REQ_FD: _set_backend_req_fd,
        Request.SET_DEVICE_STATE_FD: _set_device_state_fd,
        Request.CHECK_DEVICE_STATE: _check_device_state,
    }
