"""BackendHandler driven by the QEMU-like Frontend over a real UNIX socket."""

import os
import random
import socket
import struct

import pytest

from testkit.frontend import Frontend
from testkit.loopback import ThreadedBackend
from tests.support.vhost_user import (
    NET_FEATURES,
    RecordingDevice,
    open_fd_count,
    wait_until,
)
from vhostnet.vhost_user.backend import CLOSE, BackendHandler
from vhostnet.vhost_user.codec import (
    U64,
    DeviceStateParams,
    Header,
    LogParams,
    MemoryRegion,
    Message,
    SingleMemoryRegion,
    VringAddr,
    VringState,
)
from vhostnet.vhost_user.protocol import (
    NEED_REPLY,
    VERSION,
    ProtocolFeature,
    Request,
    VirtioFeature,
)

PF = ProtocolFeature
EXPECTED_PROTOCOL = (
    PF.MQ | PF.REPLY_ACK | PF.CONFIGURE_MEM_SLOTS | PF.STATUS | PF.RESET_DEVICE | PF.NET_MTU | PF.RARP
)


@pytest.fixture
def session(tmp_path):
    """Yield a factory: session(**handler_kwargs) -> (frontend, device, backend)."""
    opened = []

    def make(*, device_state=False, use_mem_slots=True, connect=True, **kwargs):
        device = RecordingDevice(device_state=device_state)
        handler = BackendHandler(device, **kwargs)
        device.handler = handler
        path = str(tmp_path / f"vu{len(opened)}.sock")
        backend = ThreadedBackend(path, handler, device, max_seconds=30)
        backend.start()
        frontend = Frontend(path, memory_size=16 << 20, queue_size=64, use_mem_slots=use_mem_slots)
        opened.append((frontend, backend, device))
        if connect:
            frontend.connect()
        return frontend, device, backend

    yield make
    for frontend, backend, device in opened:
        frontend.close()
        backend.join(5)
        backend.stop()
        device.close()
        assert backend.error is None


def test_feature_offers_are_exact(session):
    frontend, _device, backend = session()
    assert frontend.offered_features == NET_FEATURES | VirtioFeature.F_PROTOCOL_FEATURES
    assert frontend.protocol_features == EXPECTED_PROTOCOL
    assert backend.handler.protocol_features == EXPECTED_PROTOCOL
    assert frontend.queue_pairs == 1
    assert frontend.max_mem_slots == 32


def test_offer_log_and_device_state_add_their_bits(session):
    frontend, _device, _backend = session(offer_log=True, device_state=True)
    assert frontend.offered_features & VirtioFeature.F_LOG_ALL
    assert frontend.protocol_features == EXPECTED_PROTOCOL | PF.LOG_SHMFD | PF.DEVICE_STATE


def test_never_offers_inband_notifications_or_xen_mmap():
    for kwargs in ({}, {"offer_log": True}):
        for device_state in (False, True):
            handler = BackendHandler(RecordingDevice(device_state=device_state), **kwargs)
            offered = handler.offered_protocol_features()
            assert not offered & (PF.INBAND_NOTIFICATIONS | PF.XEN_MMAP)


def test_reply_ack_only_on_need_reply(session):
    frontend, _device, _backend = session()
    answer = frontend.request(Request.SET_OWNER, need_reply=True)
    assert answer.flags == 0x5 and U64.parse(answer.payload).value == 0
    # Without NEED_REPLY nothing comes back: the next message read is GET_FEATURES' reply.
    frontend.request(Request.SET_OWNER, expect_reply=False)
    answer = frontend.request(Request.GET_FEATURES)
    assert answer.request == Request.GET_FEATURES


def test_no_ack_before_reply_ack_is_negotiated(session):
    frontend, _device, _backend = session(connect=False)
    frontend.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    frontend.sock.settimeout(5)
    frontend.sock.connect(frontend.socket_path)
    frontend.request(Request.SET_OWNER, need_reply=True, expect_reply=False)
    assert frontend.request(Request.GET_FEATURES).request == Request.GET_FEATURES


def test_connection_sequence_reaches_device(session):
    _frontend, device, backend = session()
    wait_until(lambda: device.enabled.get(1) is True)
    assert device.enabled == {0: True, 1: True}
    assert "reset" in device.names()
    assert backend.handler.owner
    # Call fds of the handshake were lent to the device.
    assert set(device.call_fds) == {0, 1}


def test_add_mem_reg_regions_reach_device(session):
    frontend, device, backend = session()
    frontend.start()
    assert wait_until(lambda: len(device.regions) == 2)
    assert sorted(device.regions, key=lambda r: r.guest_phys_addr) == frontend.memory.memory_regions()
    assert len(backend.handler.regions) == 2


def test_duplicate_add_mem_reg_is_noop_and_closes_fd(session):
    frontend, device, backend = session()
    frontend.start()
    region = frontend.memory.memory_regions()[1]
    before = open_fd_count()
    answer = frontend.request(
        Request.ADD_MEM_REG, SingleMemoryRegion(region).emit(), [frontend.memory.fd], need_reply=True
    )
    assert U64.parse(answer.payload).value == 0
    assert len(device.regions) == 2
    assert open_fd_count() == before  # the duplicate's fd was closed, not kept
    assert device.names().count("region_added") == 2


def test_overlapping_add_mem_reg_fails(session):
    frontend, device, backend = session()
    frontend.start()
    high = frontend.memory.memory_regions()[1]
    overlapping = MemoryRegion(high.guest_phys_addr + 0x1000, 0x1000, 0x1234_0000_0000, 0)
    answer = frontend.request(
        Request.ADD_MEM_REG, SingleMemoryRegion(overlapping).emit(), [frontend.memory.fd], need_reply=True
    )
    assert U64.parse(answer.payload).value != 0
    assert backend.handler.counters["memory_overlap"] == 1
    assert len(device.regions) == 2


def test_rem_mem_reg_matches_gpa_uva_size_and_closes_stray_fd(session):
    frontend, device, backend = session()
    frontend.start()
    low = frontend.memory.memory_regions()[0]
    # A different mmap_offset still identifies the region.
    target = MemoryRegion(low.guest_phys_addr, low.memory_size, low.userspace_addr, 0x5000)
    stray = os.eventfd(0)
    answer = frontend.request(
        Request.REM_MEM_REG, SingleMemoryRegion(target).emit(), [stray], need_reply=True
    )
    os.close(stray)
    assert U64.parse(answer.payload).value == 0
    assert list(device.regions) == [frontend.memory.memory_regions()[1]]
    # Removing it again fails: it is gone.
    answer = frontend.request(Request.REM_MEM_REG, SingleMemoryRegion(target).emit(), need_reply=True)
    assert U64.parse(answer.payload).value != 0
    assert backend.handler.counters["unknown_region"] == 1
    assert backend.handler.counters["unexpected_fds"] == 0


def test_set_mem_table_path(session):
    frontend, device, backend = session(use_mem_slots=False)
    frontend.start()
    assert len(device.regions) == 2
    # Resending the same table (QEMU does on every start) keeps the mappings.
    frontend.send_memory_table()
    assert device.names().count("region_added") == 2


def test_reset_device_keeps_memory_and_stops_rings(session):
    frontend, device, backend = session()
    frontend.start()
    assert wait_until(lambda: 0 in device.started)
    frontend.request(Request.RESET_DEVICE)
    frontend.request(Request.GET_FEATURES)  # barrier
    assert len(device.regions) == 2
    assert "region_removed" not in device.names()
    ring = backend.handler.rings[0]
    assert not ring.started and not ring.enabled and not ring.kick_set


def test_ring_starts_when_its_kick_fd_arrives_with_its_config(session):
    frontend, device, backend = session()
    frontend.start(bases=(5, 9))
    # Each ring starts on SET_VRING_KICK, kicked or not (RX was, before its fd arrived).
    assert wait_until(lambda: 0 in device.started and 1 in device.started)
    rx = device.started[0]
    layout = frontend.layouts[0]
    assert rx.num == 64 and rx.base == 5 and rx.enabled
    assert rx.desc_uva == frontend.memory.uva(layout.desc_gpa)
    assert rx.avail_uva == frontend.memory.uva(layout.avail_gpa)
    assert rx.used_uva == frontend.memory.uva(layout.used_gpa)
    assert rx.log_guest_addr == layout.used_gpa
    assert device.started[1].base == 9
    names = device.names()
    assert names.index("ring_start") > names.index("ring_kick_fd")  # the fd first
    # TX had not been kicked when it started; its kicks reach the device's fd.
    assert 1 not in device.kicks
    frontend.send_frame(b"\xff" * 60)
    assert wait_until(lambda: device.kicks.get(1, 0) >= 1)


def test_get_vring_base_of_a_ring_never_started_is_the_base_set():
    device = RecordingDevice()
    handler = BackendHandler(device)
    handler.handle(Message(Request.SET_VRING_BASE, VERSION, VringState(1, 9).emit()))
    (answer,) = handler.handle(Message(Request.GET_VRING_BASE, VERSION, VringState(1, 0).emit()))
    assert VringState.parse(answer.payload) == VringState(1, 9)
    assert "ring_stop" not in device.names()


def test_ring_configured_after_its_kick_fd_starts_then():
    device = RecordingDevice()
    handler = BackendHandler(device)
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    handler.handle(Message(Request.SET_VRING_NUM, VERSION, VringState(0, 64).emit()))
    handler.handle(Message(Request.SET_VRING_KICK, VERSION, U64(0).emit(), fds=[kick]))
    assert 0 not in device.started  # no ring addresses yet
    handler.handle(Message(Request.SET_VRING_ADDR, VERSION,
                           VringAddr(0, 0, 0x1000, 0x3000, 0x2000, 0).emit()))
    assert device.started[0].num == 64 and device.started[0].desc_uva == 0x1000
    handler.close()


def test_get_vring_base_values(session):
    frontend, device, backend = session()
    frontend.start(bases=(5, 9))
    assert wait_until(lambda: 0 in device.started)
    assert wait_until(lambda: 1 in device.started)
    bases = frontend.stop()
    # Both rings ran (each started on its kick fd): the device's next avail index.
    assert bases == [5 + device.stop_advance, 9 + device.stop_advance]
    assert not device.started
    # Stopped means stopped: a stale kick must not restart the ring.
    os.eventfd_write(frontend.kick_fds[0], 1)
    frontend.request(Request.GET_FEATURES)
    assert not wait_until(lambda: 0 in device.started, timeout=0.2)
    # A second GET_VRING_BASE returns the saved value again.
    answer = frontend.request(Request.GET_VRING_BASE, VringState(0, 0).emit())
    assert VringState.parse(answer.payload) == VringState(0, 5 + device.stop_advance)


def test_enable_is_separate_from_started(session):
    frontend, device, backend = session()
    frontend.start()
    assert wait_until(lambda: 0 in device.started)
    frontend.request(Request.SET_VRING_ENABLE, VringState(0, 0).emit(), need_reply=True)
    assert device.enabled[0] is False
    assert 0 in device.started and backend.handler.rings[0].started


def test_set_features_without_protocol_features_enables_all_rings():
    device = RecordingDevice()
    handler = BackendHandler(device, max_queue_pairs=2)
    handler.handle(Message(Request.SET_FEATURES, VERSION, U64(VirtioFeature.VERSION_1).emit()))
    assert device.enabled == {0: True, 1: True, 2: True, 3: True}
    assert [r.started for r in handler.rings] == [False] * 4


def test_queue_num_and_ring_index_limit(session):
    frontend, device, backend = session(max_queue_pairs=2)
    assert frontend.queue_pairs == 2
    ok = frontend.request(Request.SET_VRING_NUM, VringState(3, 64).emit(), need_reply=True)
    assert U64.parse(ok.payload).value == 0
    bad = frontend.request(Request.SET_VRING_NUM, VringState(4, 64).emit(), need_reply=True)
    assert U64.parse(bad.payload).value != 0
    assert backend.handler.counters["bad_vring_index"] == 1


def test_malformed_and_unknown_messages_get_failures(session):
    frontend, device, backend = session()
    counters = backend.handler.counters
    answer = frontend.request(Request.SET_FEATURES, b"\x01\x02\x03", need_reply=True)
    assert U64.parse(answer.payload).value == 1
    answer = frontend.request(99, b"", need_reply=True)
    assert U64.parse(answer.payload).value == 1
    answer = frontend.request(Request.SET_VRING_NUM, VringState(0, 100).emit(), need_reply=True)
    assert U64.parse(answer.payload).value == 1
    unoffered = U64(VirtioFeature.F_RING_PACKED | VirtioFeature.F_PROTOCOL_FEATURES).emit()
    answer = frontend.request(Request.SET_FEATURES, unoffered, need_reply=True)
    assert U64.parse(answer.payload).value == 1
    # Unknown without NEED_REPLY: counted, no reply, connection still fine.
    frontend.request(100, b"xyz", expect_reply=False)
    assert frontend.request(Request.GET_FEATURES).request == Request.GET_FEATURES
    assert counters["malformed_payload"] == 1
    assert counters["unknown_request"] == 2
    assert counters["bad_ring_size"] == 1
    assert counters["unoffered_features"] == 1


def test_unanswerable_request_closes_connection(session):
    frontend, device, backend = session()
    frontend.request(Request.GET_CONFIG, bytes(12), expect_reply=False)
    with pytest.raises(ConnectionError):
        frontend.recv(timeout=5)
    assert backend.join(5) and backend.closed_by_handler


def test_oversized_header_closes_connection(session):
    frontend, device, backend = session()
    frontend.sock.sendall(Header(Request.SET_CONFIG, VERSION, 100_000).emit())
    with pytest.raises(ConnectionError):
        frontend.recv(timeout=5)
    assert backend.join(5)


def test_mtu_rarp_status(session):
    frontend, device, backend = session()
    ok = frontend.request(Request.NET_SET_MTU, U64(9000).emit(), need_reply=True)
    assert U64.parse(ok.payload).value == 0
    refused = frontend.request(Request.NET_SET_MTU, U64(9001).emit(), need_reply=True)
    assert U64.parse(refused.payload).value != 0
    mac = bytes.fromhex("525400123456")
    frontend.request(Request.SEND_RARP, mac + b"\0\0")
    frontend.request(Request.SET_STATUS, U64(0xF).emit())
    status = frontend.request(Request.GET_STATUS)
    assert U64.parse(status.payload).value == 0xF
    assert ("send_rarp", mac) in device.calls


def test_log_base_and_running_ring_log_flag(session):
    frontend, device, backend = session(offer_log=True)
    frontend.start()
    assert wait_until(lambda: 0 in device.started)
    log_fd = os.memfd_create("log")
    os.ftruncate(log_fd, 0x1000)
    answer = frontend.request(Request.SET_LOG_BASE, LogParams(0x1000, 0).emit(), [log_fd])
    os.close(log_fd)
    assert U64.parse(answer.payload).value == 0
    layout = frontend.layouts[0]
    addr = VringAddr(
        0,
        1,
        frontend.memory.uva(layout.desc_gpa),
        frontend.memory.uva(layout.used_gpa),
        frontend.memory.uva(layout.avail_gpa),
        layout.used_gpa,
    )
    answer = frontend.request(Request.SET_VRING_ADDR, addr.emit(), need_reply=True)
    assert U64.parse(answer.payload).value == 0
    assert ("ring_set_log", 0, True, layout.used_gpa) in device.calls
    assert ("set_log_base", 0x1000, 0) in device.calls


def test_device_state_transfer(session):
    frontend, device, backend = session(device_state=True)
    read_end, write_end = os.pipe()
    assert frontend.set_device_state_fd(0, write_end) == 0
    os.close(write_end)
    assert os.read(read_end, 10) == b""  # the device closed its copy: EOF
    os.close(read_end)
    answer = frontend.request(Request.CHECK_DEVICE_STATE)
    assert U64.parse(answer.payload).value == 0


def test_device_state_refused_when_not_negotiated(session):
    frontend, device, backend = session()
    read_end, write_end = os.pipe()
    answer = frontend.request(
        Request.SET_DEVICE_STATE_FD, DeviceStateParams(0, 0).emit(), [write_end]
    )
    os.close(write_end)
    assert U64.parse(answer.payload).value & 0xFF != 0
    os.close(read_end)


def test_session_leaks_no_fds(tmp_path):
    baseline = open_fd_count()
    device = RecordingDevice()
    handler = BackendHandler(device)
    device.handler = handler
    path = str(tmp_path / "leak.sock")
    with ThreadedBackend(path, handler, device, max_seconds=30) as backend:
        with Frontend(path, memory_size=16 << 20, queue_size=64) as frontend:
            frontend.connect()
            frontend.start()
            frontend.send_frame(b"\x00" * 100)
            frontend.stop()
        assert backend.join(5)
    assert backend.error is None
    assert not device.regions  # handler.close() removed them
    assert open_fd_count() == baseline


def test_handle_never_raises_on_random_messages():
    """Seeded fuzz: random ids, payloads and fds; every fd ends up closed or owned."""
    rng = random.Random(1234)
    device = RecordingDevice(device_state=True)
    handler = BackendHandler(device, offer_log=True, max_queue_pairs=2)
    handler.handle(Message(Request.SET_PROTOCOL_FEATURES, VERSION, U64(handler.offered_protocol_features()).emit()))
    baseline = open_fd_count()
    for _ in range(3000):
        request = rng.choice([*range(0, 46), 1000])
        size = rng.choice([0, 3, 8, 12, 16, 20, 24, 32, 40, 72, rng.randrange(0, 300)])
        payload = bytes(rng.randrange(256) for _ in range(size))
        if rng.random() < 0.5 and size >= 8:
            # Mostly small numbers, so that indices and sizes are sometimes valid.
            payload = struct.pack("<II", rng.randrange(5), rng.choice([0, 1, 64, 256])) + payload[8:]
        fds = [os.eventfd(0) for _ in range(rng.choice([0, 0, 1, 2]))]
        flags = VERSION | (NEED_REPLY if rng.random() < 0.5 else 0)
        result = handler.handle(Message(request, flags, payload, fds))
        assert result is CLOSE or isinstance(result, list)
        if result is not CLOSE:
            assert all(m.flags == 0x5 and m.request == request for m in result)
    handler.close()
    device.close()
    assert open_fd_count() == baseline
    assert sum(handler.counters.values()) > 0


def test_a_device_without_device_state_is_not_offered_it():
    handler = BackendHandler(RecordingDevice(device_state=False), offer_log=True)
    assert not handler.offered_protocol_features() & PF.DEVICE_STATE
    replies = handler.handle(Message(Request.GET_PROTOCOL_FEATURES, VERSION))
    assert len(replies) == 1 and handler.counters["device_error"] == 0
