"""A vhost-user front-end playing QEMU 10.0 plus a guest virtio-net driver.

For tests and benchmarks: it connects to a back-end's socket, negotiates the
way QEMU 10.0 does (reference section 3.1), hands over a two-region memfd
guest memory, sets up RX ring 0 and TX ring 1 (with ``queues`` N: rings 2k and
2k+1 of each pair k, as QEMU's ``queues=N``) and moves Ethernet frames.
Every wait is bounded.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time

from testkit.guest_memory import HIGH_RAM_START, LOW_RAM_END, GuestMemoryImage, SlotAllocator
from testkit.guest_ring import VIRTQ_DESC_F_WRITE, GuestRing, RingLayout, SplitRing
from testkit.packed_ring import FRESH_BASE, PackedRing
from vhostnet.vhost_user.codec import (
    U64,
    DeviceStateParams,
    MemoryTable,
    Message,
    SingleMemoryRegion,
    VringAddr,
    VringState,
)
from vhostnet.vhost_user.connection import close_fds, recv_message, send_message
from vhostnet.vhost_user.protocol import (
    DEVICE_STATE_NOFD,
    NEED_REPLY,
    REPLY_FLAGS,
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VERSION,
    VIRTIO_NET_HDR_SIZE,
    ProtocolFeature,
    Request,
    VirtioFeature,
)

RX_RING, TX_RING = 0, 1
# QEMU 10.0 accepts protocol bits 0-19 (and ANDs them with the offer).
QEMU10_PROTOCOL_MASK = (1 << 20) - 1
# The features this driver knows how to use.
DRIVER_FEATURES = (
    VirtioFeature.VERSION_1
    | VirtioFeature.NET_F_MRG_RXBUF
    | VirtioFeature.RING_F_EVENT_IDX
    | VirtioFeature.RING_F_INDIRECT_DESC
    | VirtioFeature.F_PROTOCOL_FEATURES
)
SLOT_SIZE = 2048
# Requests whose reply body always comes back, REPLY_ACK or not.
_ALWAYS_REPLY = {
    Request.GET_FEATURES,
    Request.GET_PROTOCOL_FEATURES,
    Request.GET_QUEUE_NUM,
    Request.GET_MAX_MEM_SLOTS,
    Request.GET_VRING_BASE,
    Request.GET_STATUS,
    Request.GET_CONFIG,
    Request.GET_INFLIGHT_FD,
    Request.SET_DEVICE_STATE_FD,
    Request.CHECK_DEVICE_STATE,
    Request.IOTLB_MSG,
    Request.POSTCOPY_ADVISE,
    Request.POSTCOPY_END,
}
_VIRTIO_NET_HDR = struct.Struct("<BBHHHHH")  # flags, gso_type, hdr_len, gso_size, csum x2, num_buffers


def _pieces(frame: bytes) -> list[bytes]:
    """A frame cut into slot-sized pieces, one descriptor each."""
    return [frame[i : i + SLOT_SIZE] for i in range(0, len(frame), SLOT_SIZE)] or [b""]


class ProtocolError(RuntimeError):
    """The back-end answered something QEMU would reject."""


class Frontend:
    """QEMU's role on a vhost-user socket, with a guest driver for its queue pairs' rings."""

    def __init__(
        self,
        socket_path: str,
        memory_size: int = 64 << 20,
        queue_size: int = 256,
        features: int | None = None,
        use_mem_slots: bool = True,
        timeout: float = 5.0,
        packed: bool = False,
        queues: int = 1,
    ) -> None:
        self.socket_path = socket_path
        # Queue pairs driven (QEMU's queues=N): more than one needs the back-end's MQ.
        self.queues = queues
        self.queue_size = queue_size
        # packed: the driver asks for VIRTIO_F_RING_PACKED (as QEMU's packed=on) and runs
        # packed rings if the back-end offers it.
        self.packed_wanted = packed
        self.wanted_features = features
        self.use_mem_slots = use_mem_slots
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.memory = GuestMemoryImage(memory_size)
        self.offered_features = 0
        self.acked_features = 0
        self.protocol_features = 0
        self.queue_pairs = 1
        self.max_mem_slots = 0
        rings = range(2 * queues)
        self.kick_fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in rings]
        self.call_fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in rings]
        self.err_fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in rings]
        # RX ring in the high region, TX ring in the low region; both regions hold buffers.
        # The rings of further pairs follow RX ring 0 in the high region.
        layout = RingLayout.packed_at if packed else RingLayout.at
        rx_layout = layout(HIGH_RAM_START + 0x40000, queue_size)
        tx_layout = layout(0x10000, queue_size)
        if tx_layout.end > 0x20000:
            raise ValueError("queue_size too large for the low-memory TX ring")
        self.layouts = [rx_layout, tx_layout]
        high_end = rx_layout.end
        for _ in range(2, 2 * queues):
            self.layouts.append(layout((high_end + 0xFFF) & ~0xFFF, queue_size))
            high_end = self.layouts[-1].end
        pool_start = (high_end + 0xFFFF) & ~0xFFFF
        pool_end = min(memory_size, pool_start + 8 * queue_size * SLOT_SIZE)
        self.slots = SlotAllocator([(0x20000, LOW_RAM_END), (pool_start, pool_end)], SLOT_SIZE)
        self.rx: GuestRing | None = None  # pair 0's rings (rings[0] and rings[1])
        self.tx: GuestRing | None = None
        self.rings: list[GuestRing] = []
        self.started = False

    # ------------------------------------------------------------------
    # Context manager and teardown

    def __enter__(self) -> Frontend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.rx = self.tx = None  # their views of guest memory go with them
        self.rings = []
        close_fds(self.kick_fds + self.call_fds + self.err_fds)
        self.kick_fds, self.call_fds, self.err_fds = [], [], []
        if self.memory is not None:
            self.memory.close()
            self.memory = None

    # ------------------------------------------------------------------
    # Raw protocol access

    @property
    def mtu_negotiated(self) -> bool:
        return bool(self.acked_features & VirtioFeature.NET_F_MTU)

    def has(self, feature: ProtocolFeature) -> bool:
        return bool(self.protocol_features & feature)

    def send(self, msg: Message) -> None:
        if self.sock is None:
            raise ConnectionError("not connected")
        send_message(self.sock, msg)

    def recv(self, timeout: float | None = None) -> Message:
        if self.sock is None:
            raise ConnectionError("not connected")
        return recv_message(self.sock, self.timeout if timeout is None else timeout)

    def request(
        self,
        req: int,
        payload: bytes = b"",
        fds: tuple[int, ...] | list[int] = (),
        need_reply: bool = False,
        expect_reply: bool | None = None,
    ) -> Message | None:
        """Send one request; return its reply if one is due, else None.

        A reply is due for requests that always answer, for SET_LOG_BASE with
        LOG_SHMFD, and for NEED_REPLY once REPLY_ACK is negotiated;
        ``expect_reply`` overrides that guess (protocol tests use it).
        """
        flags = VERSION | (NEED_REPLY if need_reply else 0)
        self.send(Message(req, flags, payload, list(fds)))
        if expect_reply is None:
            expect_reply = (
                req in _ALWAYS_REPLY
                or (req == Request.SET_LOG_BASE and self.has(ProtocolFeature.LOG_SHMFD))
                or (need_reply and self.has(ProtocolFeature.REPLY_ACK))
            )
        if not expect_reply:
            return None
        answer = self.recv()
        # The same checks QEMU's vhost_user_read_header makes.
        if answer.flags != REPLY_FLAGS:
            raise ProtocolError(f"reply flags {answer.flags:#x} instead of 0x5")
        if answer.request != req:
            raise ProtocolError(f"reply to {answer.request} while waiting for {req}")
        return answer

    def _u64_request(self, req: int) -> int:
        answer = self.request(req)
        assert answer is not None
        return U64.parse(answer.payload).value

    def _acked(self, req: int, payload: bytes = b"", fds: tuple[int, ...] | list[int] = ()) -> None:
        """Send with NEED_REPLY (when REPLY_ACK is on) and insist on success, like QEMU."""
        answer = self.request(req, payload, fds, need_reply=self.has(ProtocolFeature.REPLY_ACK))
        if answer is not None and U64.parse(answer.payload).value != 0:
            raise ProtocolError(f"{Request(req).name} failed: {answer.payload.hex()}")

    # ------------------------------------------------------------------
    # QEMU's sequences

    def connect(self) -> None:
        """Connect and run QEMU 10.0's connection-time handshake (phase 1)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.offered_features = self._u64_request(Request.GET_FEATURES)
        if not self.offered_features & VirtioFeature.F_PROTOCOL_FEATURES:
            raise ProtocolError("back-end does not offer F_PROTOCOL_FEATURES")
        offered = self._u64_request(Request.GET_PROTOCOL_FEATURES)
        self.protocol_features = offered & QEMU10_PROTOCOL_MASK
        self.request(Request.SET_PROTOCOL_FEATURES, U64(self.protocol_features).emit())
        if self.has(ProtocolFeature.MQ):
            self.queue_pairs = self._u64_request(Request.GET_QUEUE_NUM)
        if self.queues > self.queue_pairs:
            # QEMU's words: the back-end supports fewer queues than the netdev's queues=.
            raise ProtocolError(f"the back-end supports {self.queue_pairs} queue pairs, "
                                f"not {self.queues}")
        if self.has(ProtocolFeature.CONFIGURE_MEM_SLOTS):
            self.max_mem_slots = self._u64_request(Request.GET_MAX_MEM_SLOTS)
        self.request(Request.SET_OWNER)
        self._u64_request(Request.GET_FEATURES)
        for ring in range(2 * self.queues):
            self.request(Request.SET_VRING_CALL, U64(ring).emit(), [self.call_fds[ring]])
            self.request(Request.SET_VRING_ERR, U64(ring).emit(), [self.err_fds[ring]])
        if self.has(ProtocolFeature.RESET_DEVICE):
            self.request(Request.RESET_DEVICE)
        self.enable_rings()

    def enable_rings(self, enabled: bool = True) -> None:
        for ring in range(2 * self.queues):
            self._acked(Request.SET_VRING_ENABLE, VringState(ring, int(enabled)).emit())

    def _features_to_ack(self) -> int:
        wanted = DRIVER_FEATURES if self.wanted_features is None else self.wanted_features
        if self.packed_wanted:
            wanted |= VirtioFeature.F_RING_PACKED
        if self.queues > 1:
            wanted |= VirtioFeature.NET_F_MQ
        return (wanted & self.offered_features) | VirtioFeature.F_PROTOCOL_FEATURES

    @property
    def packed(self) -> bool:
        """The rings are packed (negotiated)."""
        return bool(self.acked_features & VirtioFeature.F_RING_PACKED)

    def send_memory_table(self) -> None:
        regions = self.memory.memory_regions()
        fd = self.memory.fd
        if self.use_mem_slots and self.has(ProtocolFeature.CONFIGURE_MEM_SLOTS):
            for region in regions:
                self._acked(Request.ADD_MEM_REG, SingleMemoryRegion(region).emit(), [fd])
        else:
            table = MemoryTable(tuple(regions))
            self._acked(Request.SET_MEM_TABLE, table.emit(), [fd] * len(regions))

    def start(self, bases: tuple[int, ...] | None = None,
              unkicked_tx: tuple[bytes, ...] = ()) -> None:
        """The DRIVER_OK sequence: features, memory, rings, status 0xf.

        ``bases``: SET_VRING_BASE per ring (default, and for rings past the tuple's end:
        a fresh ring of the negotiated format).

        ``unkicked_tx``: frames already on the TX ring when the back-end gets it,
        never kicked, like a guest whose kick went to the back-end before (the
        source of a migration) and which, with EVENT_IDX, will not kick again.
        """
        self.acked_features = self._features_to_ack()
        self.request(Request.SET_FEATURES, U64(self.acked_features).emit())
        status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
        if self.has(ProtocolFeature.STATUS):
            self._u64_request(Request.GET_STATUS)
            self.request(Request.SET_STATUS, U64(status).emit())
        self.send_memory_table()
        if self.packed_wanted and not self.packed:
            raise ProtocolError("the back-end did not offer VIRTIO_F_RING_PACKED")
        ring_class = PackedRing if self.packed else SplitRing
        fresh = FRESH_BASE if self.packed else 0
        bases = tuple(bases or ()) + (fresh,) * (len(self.layouts) - len(bases or ()))
        event_idx = bool(self.acked_features & VirtioFeature.RING_F_EVENT_IDX)
        self.rings = [ring_class(self.memory, layout, event_idx=event_idx)
                      for layout in self.layouts]
        self.rx, self.tx = self.rings[RX_RING], self.rings[TX_RING]
        for driver, base in zip(self.rings, bases, strict=True):
            driver.start_at(base)
        # Like Linux, fill RX and kick before the back-end even has the kick fd.
        for pair in range(self.queues):
            self._refill_rx(pair)
            self._kick(2 * pair)
        for frame in unkicked_tx:
            self._queue_tx(frame, None)
        for ring, driver in enumerate(self.rings):
            layout = driver.layout
            self.request(Request.SET_VRING_NUM, VringState(ring, layout.size).emit())
            self.request(Request.SET_VRING_BASE, VringState(ring, bases[ring]).emit())
            desc_uva, avail_uva, used_uva = driver.ring_uvas
            addr = VringAddr(ring, 0, desc_uva, used_uva, avail_uva, layout.used_gpa)
            self.request(Request.SET_VRING_ADDR, addr.emit())
            self.request(Request.SET_VRING_KICK, U64(ring).emit(), [self.kick_fds[ring]])
            self.request(Request.SET_VRING_CALL, U64(ring).emit(), [self.call_fds[ring]])
        if self.has(ProtocolFeature.STATUS):
            self._u64_request(Request.GET_STATUS)
            self.request(Request.SET_STATUS, U64(status | STATUS_DRIVER_OK).emit())
        self.started = True

    def stop(self) -> list[int]:
        """QEMU 10.0's stop: GET_VRING_BASE per ring, then SET_STATUS(0)."""
        bases = []
        for ring in range(2 * self.queues):
            answer = self.request(Request.GET_VRING_BASE, VringState(ring, 0).emit())
            assert answer is not None
            state = VringState.parse(answer.payload)
            if state.index != ring:
                raise ProtocolError(f"GET_VRING_BASE answered for ring {state.index}")
            bases.append(state.num)
        if self.has(ProtocolFeature.STATUS):
            self.request(Request.SET_STATUS, U64(0).emit())
        self.started = False
        return bases

    stop_rings = stop  # the name used in docs/ARCHITECTURE.md

    # ------------------------------------------------------------------
    # Frames

    @property
    def _mrg_rxbuf(self) -> bool:
        return bool(self.acked_features & VirtioFeature.NET_F_MRG_RXBUF)

    def _kick(self, ring: int) -> None:
        os.eventfd_write(self.kick_fds[ring], 1)

    def _refill_rx(self, pair: int = 0) -> int:
        """Post as many empty RX buffers on the pair's RX ring as descriptors and slots allow."""
        rx = self.rings[2 * pair]
        posted = 0
        while rx.free_descriptors and rx.in_flight < self.queue_size:
            if self.slots.available <= self.queue_size // 4:
                break  # keep slots for TX
            gpa = self.slots.alloc()
            if gpa is None:
                break
            rx.queue_chain([(gpa, SLOT_SIZE, VIRTQ_DESC_F_WRITE)], gpa)
            posted += 1
        return posted

    def _reclaim_tx(self, pair: int = 0) -> None:
        for token, _length in self.rings[2 * pair + 1].collect_used():
            for gpa in token:  # type: ignore[union-attr]
                self.slots.free(gpa)

    def send_frame(self, frame: bytes, header: bytes | None = None, pair: int = 0,
                   kick: bool = True) -> None:
        """Queue one Ethernet frame on the pair's TX ring (header in its own descriptor) and kick.

        ``header`` is the virtio-net header to send (default: all zero, no offloads).
        ``kick=False``: the frame is published but the kick never comes, as from a guest whose
        missing memory barrier let it read a stale avail_event.
        """
        if not self.rings:
            raise RuntimeError("start() first")
        tx = self.rings[2 * pair + 1]
        pieces = _pieces(frame)
        deadline = time.monotonic() + self.timeout
        while True:
            self._reclaim_tx(pair)
            if tx.free_descriptors >= len(pieces) + 1 and self.slots.available >= len(pieces) + 1:
                break
            if time.monotonic() >= deadline:
                raise TimeoutError("TX ring stayed full")
            self._wait_call(2 * pair + 1, 0.01)
        self._queue_tx(frame, header, pair)
        if kick:
            self._kick(2 * pair + 1)

    def _queue_tx(self, frame: bytes, header: bytes | None, pair: int = 0) -> None:
        """Put one frame on the pair's TX ring without kicking; the caller made sure it fits."""
        header_gpa = self.slots.alloc()
        assert header_gpa is not None
        self.memory.write(header_gpa, bytes(VIRTIO_NET_HDR_SIZE) if header is None else header)
        chain = [(header_gpa, VIRTIO_NET_HDR_SIZE, 0)]
        used_slots = [header_gpa]
        for piece in _pieces(frame):
            gpa = self.slots.alloc()
            assert gpa is not None
            self.memory.write(gpa, piece)
            chain.append((gpa, len(piece), 0))
            used_slots.append(gpa)
        self.rings[2 * pair + 1].queue_chain(chain, used_slots)

    def tx_pending(self, pair: int = 0) -> int:
        """TX chains of the pair the back-end has not completed yet."""
        if not self.rings:
            return 0
        self._reclaim_tx(pair)
        return self.rings[2 * pair + 1].in_flight

    def _wait_call(self, ring: int, timeout: float) -> None:
        fd = self.call_fds[ring]
        ready, _, _ = select.select([fd], [], [], max(0.0, timeout))
        if ready:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass

    def receive_frames(self, timeout: float = 1.0, pair: int = 0) -> list[bytes]:
        """Frames the back-end wrote to the pair's RX ring, waiting up to ``timeout`` for the first."""
        if not self.rings:
            raise RuntimeError("start() first")
        rx = self.rings[2 * pair]
        deadline = time.monotonic() + timeout
        while not rx.has_used():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            # Poll as well as wait: the back-end may rightly skip an interrupt.
            self._wait_call(2 * pair, min(remaining, 0.02))
        completed = rx.collect_used()
        frames = []
        position = 0
        while position < len(completed):
            gpa, length = completed[position]
            header = _VIRTIO_NET_HDR.unpack(self.memory.read(gpa, VIRTIO_NET_HDR_SIZE))
            count = header[6] if self._mrg_rxbuf else 1
            if count < 1 or position + count > len(completed):
                raise ProtocolError(f"num_buffers {count} with {len(completed) - position} buffers used")
            data = bytearray(self.memory.read(gpa, length)[VIRTIO_NET_HDR_SIZE:])
            for extra_gpa, extra_length in completed[position + 1 : position + count]:
                data += self.memory.read(extra_gpa, extra_length)
            frames.append(bytes(data))
            position += count
        for gpa, _ in completed:
            self.slots.free(gpa)
        if self._refill_rx(pair):
            self._kick(2 * pair)
        return frames

    # ------------------------------------------------------------------
    # Migration helpers (device state transfer, dirty log) for protocol tests

    def set_device_state_fd(self, direction: int, fd: int) -> int:
        answer = self.request(Request.SET_DEVICE_STATE_FD, DeviceStateParams(direction, 0).emit(), [fd])
        assert answer is not None
        value = U64.parse(answer.payload).value
        if not value & DEVICE_STATE_NOFD:
            raise ProtocolError("back-end returned its own device-state fd")
        return value & 0xFF
