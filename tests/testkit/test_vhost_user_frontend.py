"""The test front-end against an echo back-end with a tiny device-side ring in Python.

The echo device here is independent of vhostnet.virtqueue on purpose: it checks
the front-end's guest driver (ring layout, two regions, uva vs gpa, header,
num_buffers merging) against a second, straightforward reading of the spec.
"""

import mmap
import os
import struct

import pytest

from testkit.frontend import Frontend
from testkit.guest_memory import HIGH_RAM_START, LOW_RAM_END
from testkit.loopback import ThreadedBackend
from tests.support.vhost_user import RecordingDevice, open_fd_count, wait_until
from vhostnet.vhost_user.backend import BackendHandler
from vhostnet.vhost_user.protocol import VirtioFeature

HDR = 12
DESC_F_NEXT, DESC_F_WRITE = 1, 2


class EchoDevice(RecordingDevice):
    """Sends every TX frame straight back on RX."""

    def __init__(self) -> None:
        super().__init__()
        self.maps = {}
        self.rings = {}
        self.pending: list[bytes] = []
        self.tx_gpas: list[int] = []
        self.mrg_rxbuf = False

    def features_set(self, features):
        super().features_set(features)
        self.mrg_rxbuf = bool(features & VirtioFeature.NET_F_MRG_RXBUF)

    def region_added(self, region, fd):
        super().region_added(region, fd)
        self.maps[region] = mmap.mmap(fd, region.mmap_offset + region.memory_size, mmap.MAP_SHARED)

    def region_removed(self, region):
        self.maps.pop(region).close()
        super().region_removed(region)

    def close(self):
        for m in self.maps.values():
            m.close()
        self.maps.clear()
        super().close()

    def _locate(self, addr, length, by_uva):
        for region, m in self.maps.items():
            start = region.userspace_addr if by_uva else region.guest_phys_addr
            if start <= addr and addr + length <= start + region.memory_size:
                return m, region.mmap_offset + addr - start
        raise AssertionError(f"address {addr:#x} outside guest memory (uva={by_uva})")

    def read(self, addr, length, by_uva=False):
        m, off = self._locate(addr, length, by_uva)
        return m[off : off + length]

    def write(self, addr, data, by_uva=False):
        m, off = self._locate(addr, len(data), by_uva)
        m[off : off + len(data)] = data

    def u16(self, uva):
        return struct.unpack("<H", self.read(uva, 2, True))[0]

    def ring_start(self, index, ring):
        super().ring_start(index, ring)
        self.rings[index] = {"cfg": ring, "last_avail": ring.base, "used": ring.base}

    def ring_stop(self, index):
        self.started.pop(index)
        return self.rings.pop(index)["last_avail"]

    def _pop_chain(self, index):
        state = self.rings[index]
        cfg = state["cfg"]
        if self.u16(cfg.avail_uva + 2) == state["last_avail"]:
            return None
        slot = cfg.avail_uva + 4 + 2 * (state["last_avail"] % cfg.num)
        head = self.u16(slot)
        state["last_avail"] = (state["last_avail"] + 1) & 0xFFFF
        chain, desc = [], head
        for _ in range(cfg.num):
            addr, length, flags, nxt = struct.unpack("<QIHH", self.read(cfg.desc_uva + 16 * desc, 16, True))
            chain.append((addr, length, flags))
            if not flags & DESC_F_NEXT:
                break
            desc = nxt
        return head, chain

    def _push_used(self, index, entries):
        state = self.rings[index]
        cfg = state["cfg"]
        for head, length in entries:
            slot = cfg.used_uva + 4 + 8 * (state["used"] % cfg.num)
            self.write(slot, struct.pack("<II", head, length), True)
            state["used"] = (state["used"] + 1) & 0xFFFF
        self.write(cfg.used_uva + 2, struct.pack("<H", state["used"]), True)
        fd = self.call_fds.get(index)
        if fd is not None:
            os.eventfd_write(fd, 1)

    def _kicked(self, index):
        super()._kicked(index)
        if 1 in self.rings and index == 1:
            done = []
            while (popped := self._pop_chain(1)) is not None:
                head, chain = popped
                data = b"".join(self.read(a, n) for a, n, _ in chain)
                self.tx_gpas.extend(a for a, _, _ in chain)
                self.pending.append(data[HDR:])
                done.append((head, 0))
            if done:
                self._push_used(1, done)
        self._deliver()

    def _deliver(self):
        if 0 not in self.rings:
            return
        while self.pending:
            frame = self.pending[0]
            packet = bytes(HDR) + frame
            state = self.rings[0]
            saved = state["last_avail"]
            used, offset = [], 0
            while offset < len(packet):
                popped = self._pop_chain(0)
                if popped is None or (used and not self.mrg_rxbuf):
                    state["last_avail"] = saved  # not enough buffers yet: retry on next kick
                    return
                head, [(addr, length, flags)] = popped
                assert flags & DESC_F_WRITE
                piece = packet[offset : offset + length]
                self.write(addr, piece)
                used.append((head, len(piece), addr))
                offset += len(piece)
            # num_buffers lives in the first buffer's header.
            self.write(used[0][2] + 10, struct.pack("<H", len(used)))
            self._push_used(0, [(h, n) for h, n, _ in used])
            self.pending.pop(0)


@pytest.fixture
def echo(tmp_path):
    made = []

    def make(**frontend_kwargs):
        device = EchoDevice()
        handler = BackendHandler(device)
        device.handler = handler
        path = str(tmp_path / f"echo{len(made)}.sock")
        backend = ThreadedBackend(path, handler, device, max_seconds=60)
        backend.start()
        frontend = Frontend(path, memory_size=16 << 20, queue_size=64, **frontend_kwargs)
        made.append((frontend, backend, device))
        frontend.connect()
        frontend.start()
        return frontend, device

    yield make
    for frontend, backend, device in made:
        frontend.close()
        backend.join(5)
        backend.stop()
        device.close()
        assert backend.error is None


def _frame(n, size):
    body = bytes((n + i) % 251 for i in range(size - 14))
    return b"\x52\x54\x00\x12\x34\x56" + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x00" + body


def _receive(frontend, count):
    frames = []
    for _ in range(200):
        frames += frontend.receive_frames(timeout=0.05)
        if len(frames) >= count:
            break
    return frames


def test_default_features_are_offered_and_driver_supported(echo):
    frontend, device = echo()
    assert frontend.acked_features == (
        VirtioFeature.VERSION_1
        | VirtioFeature.NET_F_MRG_RXBUF
        | VirtioFeature.RING_F_EVENT_IDX
        | VirtioFeature.RING_F_INDIRECT_DESC
        | VirtioFeature.F_PROTOCOL_FEATURES
    )
    assert ("features_set", frontend.acked_features) in device.calls


def test_echo_small_and_large_frames(echo):
    frontend, device = echo()
    sent = [_frame(1, 60), _frame(2, 1514), _frame(3, 5000)]
    for frame in sent:
        frontend.send_frame(frame)
    assert _receive(frontend, 3) == sent
    # Descriptor buffers came from both regions, and only ever from inside them.
    assert any(gpa < LOW_RAM_END for gpa in device.tx_gpas)
    assert any(gpa >= HIGH_RAM_START for gpa in device.tx_gpas)


def test_many_frames_wrap_the_rings(echo):
    frontend, device = echo()
    sent, got = [], []
    for n in range(300):  # several times the ring size of 64
        frame = _frame(n, 60 + n % 1400)
        frontend.send_frame(frame)
        sent.append(frame)
        if n % 8 == 7:
            got += _receive(frontend, 8)
    got += _receive(frontend, len(sent) - len(got))
    assert got == sent
    assert wait_until(lambda: frontend.tx_pending() == 0)


def test_stop_reports_bases_and_resume_continues(echo):
    frontend, device = echo()
    for n in range(5):
        frontend.send_frame(_frame(n, 100))
    assert len(_receive(frontend, 5)) == 5
    bases = frontend.stop()
    assert bases[1] == 5  # five TX chains consumed
    assert bases[0] == 5  # one RX buffer each
    frontend.start(bases=tuple(bases))
    frontend.send_frame(_frame(9, 200))
    assert _receive(frontend, 1) == [_frame(9, 200)]
    assert device.rings[1]["cfg"].base == 5


def test_without_mrg_rxbuf(echo):
    frontend, device = echo(features=VirtioFeature.VERSION_1)
    assert not frontend.acked_features & VirtioFeature.NET_F_MRG_RXBUF
    frontend.send_frame(_frame(4, 1514))
    assert _receive(frontend, 1) == [_frame(4, 1514)]


def test_set_mem_table_front_end(echo):
    frontend, device = echo(use_mem_slots=False)
    frontend.send_frame(_frame(5, 300))
    assert _receive(frontend, 1) == [_frame(5, 300)]


def test_receive_times_out_empty(echo):
    frontend, _device = echo()
    assert frontend.receive_frames(timeout=0.05) == []


def test_context_manager_closes_everything(tmp_path):
    baseline = open_fd_count()
    with Frontend(str(tmp_path / "none.sock"), memory_size=16 << 20) as frontend:
        assert frontend.memory.fd >= 0
        with pytest.raises(OSError):
            frontend.connect()  # nobody listens
    assert open_fd_count() == baseline
