"""Stream mode (QEMU's ``-netdev stream``): the framer, protocol detection, and the real
vhostnet process serving a stream peer on its one socket."""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
import time
from collections import deque
from pathlib import Path

import pytest
from vhostnet._stream import StreamSender

from testkit.frontend import Frontend
from tests.support.daemon import VhostnetProcess, echo_request, gateway_mac
from tests.support.frames import GATEWAY_IP, GUEST_MAC, arp_request
from tests.support.pcap import read_pcap
from vhostnet.network import GuestBatch, Network
from vhostnet.stack.config import StackConfig
from vhostnet.stream import (
    MAX_FRAME,
    SEND_FRAMES,
    StreamDevice,
    StreamError,
    StreamFramer,
    encode_frames,
    looks_like_vhost_user,
)
from vhostnet.vhost_user.protocol import Request
from vhostnet.virtqueue import FrameBatch
from vhostnet.wire.checksum import internet_checksum


def _frames(batch: FrameBatch, count: int) -> list[bytes]:
    return [bytes(batch.frame(i)) for i in range(count)]


def _take(framer: StreamFramer) -> list[bytes]:
    """Every whole frame ``framer`` holds, copied out of its batch."""
    got: list[bytes] = []
    while True:
        count = framer.next_frames()
        got += _frames(framer.batch, count)
        if count < framer.batch.capacity_frames:
            return got


def test_framer_joins_frames_split_across_reads() -> None:
    frames = [bytes([n]) * size for n, size in enumerate((14, 60, 1514, 9000, 65549))]
    wire = encode_frames(frames)
    framer = StreamFramer(frames=16)
    got: list[bytes] = []
    for start in range(0, len(wire), 7):  # 7-byte reads: lengths and frames cut anywhere
        framer.feed(wire[start:start + 7])
        got += _take(framer)
    assert got == frames
    assert framer.buffered == 0


def test_framer_takes_many_frames_per_read_and_stops_at_a_full_batch() -> None:
    frames = [struct.pack("!H", n) * 30 for n in range(300)]
    framer = StreamFramer(frames=256)
    framer.feed(encode_frames(frames))
    first = framer.next_frames()
    assert first == 256 and _frames(framer.batch, first) == frames[:256]
    assert _frames(framer.batch, framer.next_frames()) == frames[256:]
    assert framer.next_frames() == 0 and framer.batch.count == 0


def test_framer_reads_into_its_own_buffer_in_bounded_memory() -> None:
    framer = StreamFramer(chunk=4096)
    frame = bytes(range(256)) * 5 + b"\x01" * 120  # 1400 bytes
    wire = encode_frames([frame]) * 200
    count = 0
    position = 0
    while position < len(wire):
        space = framer.space()
        assert len(space) <= 4096 + 4 + MAX_FRAME
        taken = min(len(space), len(wire) - position)
        space[:taken] = wire[position:position + taken]
        framer.filled(taken)
        position += taken
        added = _take(framer)
        assert added == [frame] * len(added)
        count += len(added)
    assert count == 200


@pytest.mark.parametrize("length", [0, 13, MAX_FRAME + 1, 1 << 20])
def test_framer_refuses_lengths_no_frame_has(length: int) -> None:
    framer = StreamFramer()
    framer.feed(encode_frames([b"\x00" * 60]) + struct.pack("!I", length) + b"\x00" * 64)
    with pytest.raises(StreamError):
        framer.next_frames()
    assert framer.batch.count == 1  # the good frame before it was delivered


def test_frames_stay_where_they_were_read_no_copy() -> None:
    """The framer's batch is its read buffer: a frame is the bytes recv wrote, in place."""
    frames = [bytes([n]) * (100 + n) for n in range(5)]
    framer = StreamFramer(chunk=4096, frames=8)
    ours, peer = socket.socketpair()
    with ours, peer:
        peer.sendall(encode_frames(frames))
        space = framer.space()
        framer.filled(ours.recv_into(space))
        assert framer.next_frames() == len(frames)
        storage = framer.batch.arrays()[0]
        assert space.obj is storage  # read straight into the batch's storage
        for index, frame in enumerate(frames):
            view = framer.batch.frame(index)
            assert view.obj is storage and bytes(view) == frame


def test_a_batch_takes_only_frames_written_inside_its_storage() -> None:
    batch = FrameBatch(4, 1000)
    storage, offsets, lengths, _vnets = batch.arrays()
    storage[:100] = 7
    offsets[:2] = (0, 50)
    lengths[:2] = (50, 50)
    batch.take_written(2)
    assert batch.count == 2 and bytes(batch.frame(1)) == b"\x07" * 50
    assert batch.append(b"\x01" * 14)  # appended after the taken frames
    assert batch.frame(2).tobytes() == b"\x01" * 14
    offsets[0] = 990
    with pytest.raises(ValueError):
        batch.take_written(1)
    with pytest.raises(ValueError):
        batch.take_written(5)


def test_the_send_side_joins_frames_and_drops_what_a_stream_cannot_carry() -> None:
    loop = asyncio.new_event_loop()
    network = Network(StackConfig(), loop)
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    device = StreamDevice(loop, network, ours)
    try:
        good = [bytes(12) + b"\x88\xb5" + bytes([n]) * 60 for n in range(5)]
        queue = network.frames_to_guest
        queue.append(good[0])
        queue.append(b"\x00" * 13)  # shorter than an Ethernet header
        queue.append((good[1], 1))  # offload fields a stream guest cannot take
        queue.append(bytearray(good[2]))  # not bytes: taken through the buffer protocol
        queue.append(memoryview(good[3]))
        queue.append(good[4])
        _run_until(loop, lambda: device.counters["rx.frames"] == 4)
        wire = b""
        peer.settimeout(5)
        while len(wire) < 4 * (4 + 74):
            wire += peer.recv(65536)
        assert wire == encode_frames([good[0], good[2], good[3], good[4]])
        assert device.counters["rx.dropped_unsendable"] == 1
        assert device.counters["rx.dropped_offloaded"] == 1
        assert not queue
    finally:
        device.close()
        ours.close()
        peer.close()
        network.close()
        loop.close()


def test_detection_tells_vhost_user_from_a_frame_length() -> None:
    for request in (Request.GET_FEATURES, Request.SET_OWNER, Request.GET_PROTOCOL_FEATURES):
        assert looks_like_vhost_user(struct.pack("<I", request))
    assert not looks_like_vhost_user(struct.pack("!I", 42))
    assert not looks_like_vhost_user(struct.pack("!I", MAX_FRAME))


# ---- the real process ------------------------------------------------------------------


class StreamPeer:
    """QEMU's ``-netdev stream`` side, in a test: length-prefixed frames over the socket."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.framer = StreamFramer()

    def send(self, *frames: bytes) -> None:
        self.sock.sendall(encode_frames(list(frames)))

    def receive(self, count: int, timeout: float = 5.0) -> list[bytes]:
        frames: list[bytes] = []
        deadline = time.monotonic() + timeout
        while len(frames) < count:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            assert data, "vhostnet closed the stream"
            self.framer.feed(data)
            frames += _take(self.framer)
        return frames

    def close(self) -> None:
        self.sock.close()


def _closed_by_vhostnet(sock: socket.socket) -> bool:
    """True once vhostnet closed the connection (a reset if it left our bytes unread)."""
    try:
        return sock.recv(64) == b""
    except ConnectionResetError:
        return True


def _stream_gateway_mac(peer: StreamPeer) -> bytes:
    peer.send(arp_request(GATEWAY_IP))
    reply = peer.receive(1)[0]
    assert reply[12:14] == b"\x08\x06" and reply[0:6] == GUEST_MAC
    return reply[22:28]


@pytest.fixture
def capturing_server(tmp_path: Path):
    process = VhostnetProcess(tmp_path, "--pcap", str(tmp_path / "vn.pcap"))
    try:
        yield process
    finally:
        assert process.stop() == 0, process.log_path.read_text()


def test_a_stream_peer_gets_arp_and_ping_answers_and_a_capture(
        capturing_server: VhostnetProcess, tmp_path: Path) -> None:
    peer = StreamPeer(capturing_server.socket_path)
    time.sleep(0.3)  # silent first: nothing may wait for it to speak
    mac = _stream_gateway_mac(peer)
    payloads = [bytes((seq + i) & 0xFF for i in range(size)) for seq, size in
                enumerate([8, 1000, 1472] * 20)]
    # All at once: many frames per read, many replies per send.
    peer.send(*(echo_request(mac, payload, seq) for seq, payload in enumerate(payloads, 1)))
    replies = peer.receive(len(payloads))
    assert [reply[42:] for reply in replies] == payloads
    for reply in replies:  # no offloads in stream mode: full, correct ICMP checksums
        assert internet_checksum(reply[34:]) == 0
    stats = capturing_server.stats()
    assert stats["stream.tx.frames"] == len(payloads) + 1
    assert stats["stream.rx.frames"] == len(payloads) + 1
    peer.close()
    assert capturing_server.stop() == 0
    records = read_pcap(tmp_path / "vn.pcap")
    sent = [arp_request(GATEWAY_IP)] + [echo_request(mac, p, s) for s, p in enumerate(payloads, 1)]
    captured = [frame for _, frame in records]
    assert [frame for frame in captured if frame[6:12] == GUEST_MAC] == sent
    to_guest = [frame for frame in captured if frame[0:6] == GUEST_MAC]
    assert to_guest[0][12:14] == b"\x08\x06" and to_guest[1:] == replies
    times = [when for when, _ in records]
    assert times == sorted(times) and abs(times[0] - time.time()) < 60

def test_a_bad_length_closes_that_stream_only(server: VhostnetProcess) -> None:
    bad = StreamPeer(server.socket_path)
    bad.sock.sendall(struct.pack("!I", 5) + b"short")
    assert _closed_by_vhostnet(bad.sock)
    bad.close()
    assert server.stats()["stream.protocol_errors"] == 1
    assert "malformed stream" in server.log_path.read_text()
    peer = StreamPeer(server.socket_path)
    _stream_gateway_mac(peer)
    peer.close()


def test_a_silent_peer_holds_the_socket_and_vhost_user_follows_it(server: VhostnetProcess) -> None:
    silent = StreamPeer(server.socket_path)
    time.sleep(0.3)
    second = StreamPeer(server.socket_path)
    assert _closed_by_vhostnet(second.sock), "one front-end at a time, even an undecided one"
    second.close()
    silent.close()
    deadline = time.monotonic() + 5
    while "before sending anything" not in server.log_path.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with Frontend(server.socket_path) as frontend:
        frontend.connect()
        frontend.start()
        mac = gateway_mac(frontend)
        frontend.send_frame(echo_request(mac, b"vhost-user after a stream", 1))
        assert frontend.receive_frames(timeout=5)[0][42:] == b"vhost-user after a stream"


def test_vhost_user_only_refuses_a_stream_peer(tmp_path: Path) -> None:
    process = VhostnetProcess(tmp_path, "--vhost-user")
    try:
        peer = StreamPeer(process.socket_path)
        peer.send(arp_request(GATEWAY_IP))
        assert _closed_by_vhostnet(peer.sock)
        peer.close()
        assert process.stats()["server.refused_stream"] == 1
        assert "--vhost-user allows vhost-user only" in process.log_path.read_text()
        with Frontend(process.socket_path) as frontend:
            frontend.connect()
            frontend.start()
            gateway_mac(frontend)
    finally:
        assert process.stop() == 0, process.log_path.read_text()


# ---- the device in-process: the peer that stops reading ----------------------------------


def _run_until(loop: asyncio.AbstractEventLoop, done, limit: float = 5.0) -> None:
    deadline = time.monotonic() + limit
    while not done():
        assert time.monotonic() < deadline
        loop.run_until_complete(asyncio.sleep(0.01))


def test_a_peer_that_stops_reading_leaves_frames_queued_then_gets_them_all() -> None:
    loop = asyncio.new_event_loop()
    network = Network(StackConfig(), loop)
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    device = StreamDevice(loop, network, ours)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)  # after the device enlarged it
    try:
        frames = [bytes(12) + b"\x88\xb5" + n.to_bytes(4, "big") * 350 for n in range(2000)]
        network.frames_to_guest.append((frames[0], 1))  # a vhost-user guest's leftover
        for frame in frames:
            network.frames_to_guest.append(frame)
        _run_until(loop, lambda: device.counters["rx.send_waits"] > 0)
        assert network.frames_to_guest, "the socket is full: the rest waits in the network"
        reader = StreamFramer()
        got: list[bytes] = []
        peer.setblocking(False)

        def read_some() -> bool:
            try:
                reader.feed(peer.recv(65536))
            except BlockingIOError:
                pass
            got.extend(_take(reader))
            return len(got) == len(frames)

        _run_until(loop, read_some)
        assert got == frames
        assert device.counters["rx.dropped_offloaded"] == 1
        assert device.counters["rx.frames"] == len(frames)
    finally:
        device.close()
        ours.close()
        peer.close()
        network.close()
        loop.close()


# ---- the sender: frames gathered where they lie, one sendmsg ------------------------------


def _frame(n: int, size: int = 74) -> bytes:
    return bytes(12) + b"\x88\xb5" + (n.to_bytes(4, "big") * (size // 4 + 1))[:size - 14]


def _built(frames: list[bytes]) -> GuestBatch:
    batch = FrameBatch(len(frames), sum(len(frame) for frame in frames))
    for frame in frames:
        assert batch.append(frame)
    return GuestBatch(batch)


def _read_all(peer: socket.socket) -> bytes:
    """What waits on the non-blocking ``peer``."""
    chunks = []
    while True:
        try:
            chunk = peer.recv(1 << 20)
        except BlockingIOError:
            return b"".join(chunks)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def test_the_sender_puts_every_kind_of_entry_on_the_wire_byte_for_byte(pair) -> None:
    ours, peer = pair
    frames = [_frame(n, 60 + n) for n in range(9)]
    built = _built(frames[2:6])
    built.start = 1  # frames[2] went before: not again
    pending = deque([frames[0], bytearray(frames[1]), (frames[2], 1), built, b"\x00" * 13,
                     memoryview(frames[6]), _frame(7, MAX_FRAME + 1), frames[7]])
    captured: list[bytes] = []
    sent, count, offloaded, unsendable, error = StreamSender().send(
        ours.fileno(), pending, SEND_FRAMES, 1 << 20, GuestBatch, captured)
    expected = [frames[0], frames[1], *frames[3:7], frames[7]]
    assert (count, offloaded, unsendable, error) == (len(expected), 1, 2, 0)
    assert _read_all(peer) == encode_frames(expected)
    assert sent == len(encode_frames(expected))
    assert captured == expected
    assert not pending


def test_the_sender_stops_at_its_limits_and_a_cut_batch_keeps_its_place(pair) -> None:
    ours, peer = pair
    frames = [_frame(n) for n in range(6)]
    before, after = _frame(100), _frame(101)
    entry = _built(frames)
    pending = deque([before, entry, after])
    sender = StreamSender()
    # Four frames allowed: the batch is cut after three of its own and stays at the front.
    _sent, count, _, _, error = sender.send(ours.fileno(), pending, 4, 1 << 20, GuestBatch)
    assert (count, error) == (4, 0)
    assert pending[0] is entry and entry.start == 3
    _sent, count, _, _, error = sender.send(ours.fileno(), pending, 100, 1 << 20, GuestBatch)
    assert (count, error) == (4, 0) and not pending
    assert entry.start == len(frames)  # all of it went (the switch reads this)
    assert _read_all(peer) == encode_frames([before, *frames, after])


def test_more_frames_than_one_sendmsg_takes_go_in_several_in_order(pair) -> None:
    ours, peer = pair
    frames = [_frame(n, 60) for n in range(3 * SEND_FRAMES + 7)]
    pending = deque([*frames[:SEND_FRAMES + 3], _built(frames[SEND_FRAMES + 3:])])
    sender = StreamSender()
    sends = 0
    wire = b""
    while pending:
        _sent, count, _, _, error = sender.send(ours.fileno(), pending, 10 * SEND_FRAMES,
                                                1 << 24, GuestBatch)
        assert error == 0 and count <= SEND_FRAMES  # IOV_MAX: two iovecs a frame
        sends += 1
        wire += _read_all(peer)
        assert sends < 10
    assert sends == 4
    assert wire == encode_frames(frames)


def test_short_sends_resume_exactly_where_they_stopped(pair) -> None:
    """A full socket takes part of a frame: its tail goes first next time, nothing is lost,
    resent or reordered, even though the batch it came from is reused at once."""
    ours, peer = pair
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    frames = [_frame(n, 1000 + 37 * n) for n in range(60)]
    entry = _built(frames[10:50])
    pending = deque([*frames[:10], entry, *frames[50:]])
    sender = StreamSender()
    wire = b""
    cuts = 0
    for _ in range(10_000):
        if not pending and not sender.cut_bytes:
            break
        _sent, _count, _, _, error = sender.send(ours.fileno(), pending, 7, 1 << 20, GuestBatch)
        assert error in (0, errno.EAGAIN)
        cuts += sender.cut_bytes > 0
        if entry.start:  # the frames taken are the owner's again: scribble over them
            storage = entry.batch.arrays()[0]
            storage[:int(entry.batch.arrays()[1][entry.start - 1])] = 0xEE
        wire += _read_all(peer)
    assert not pending and not sender.cut_bytes
    assert cuts > 0, "the socket never cut a frame: the test did not test resumption"
    assert wire == encode_frames(frames)


def test_a_full_socket_takes_nothing_and_the_queue_keeps_it(pair) -> None:
    ours, peer = pair
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sender = StreamSender()
    pending = deque(_frame(n, 1500) for n in range(100))
    sent, count, _, _, error = sender.send(ours.fileno(), pending, 100, 1 << 20)
    assert 0 < sent < 100 * 1504 and error == errno.EAGAIN  # a short send: wait for writable
    assert len(pending) == 100 - count
    left, cut = len(pending), sender.cut_bytes
    sent, count, _, _, error = sender.send(ours.fileno(), pending, 100, 1 << 20)
    assert (sent, count, error) == (0, 0, errno.EAGAIN)
    assert (len(pending), sender.cut_bytes) == (left, cut)


def test_a_send_error_is_reported_and_takes_nothing(pair) -> None:
    ours, peer = pair
    peer.close()
    pending = deque([_frame(1)])
    sent, count, _, _, error = StreamSender().send(ours.fileno(), pending, 10, 1 << 20)
    assert (sent, count, error) == (0, 0, errno.EPIPE)
    assert len(pending) == 1


def test_the_device_asks_for_socket_buffers_as_large_as_passt_does(pair) -> None:
    ours, _peer = pair
    loop = asyncio.new_event_loop()
    network = Network(StackConfig(), loop)
    default = ours.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    device = StreamDevice(loop, network, ours)
    try:
        for option, limit in ((socket.SO_SNDBUF, "wmem_max"), (socket.SO_RCVBUF, "rmem_max")):
            allowed = int(Path(f"/proc/sys/net/core/{limit}").read_text())
            # Linux doubles the figure asked for (bookkeeping), capped by the sysctl.
            assert ours.getsockopt(socket.SOL_SOCKET, option) == max(2 * allowed, default)
    finally:
        device.close()
        network.close()
        loop.close()


def test_frames_queued_while_the_socket_is_full_wait_for_writable_without_sending(pair) -> None:
    """A full socket means one wait for writable: frames queued meanwhile cost no send."""
    ours, peer = pair
    loop = asyncio.new_event_loop()
    network = Network(StackConfig(), loop)
    device = StreamDevice(loop, network, ours)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    try:
        big, later = _frame(1, 60000), [_frame(n, 1000) for n in range(2, 6)]
        network.frames_to_guest.append(big)
        _run_until(loop, lambda: device.counters["rx.send_waits"] == 1)
        assert not network.frames_to_guest and device.sender.cut_bytes  # big is cut
        sends = device.counters["rx.sends"]
        for frame in later:
            network.frames_to_guest.append(frame)
            loop.run_until_complete(asyncio.sleep(0.01))
        assert device.counters["rx.sends"] == sends
        wire = b""

        def read_some() -> bool:
            nonlocal wire
            wire += _read_all(peer)
            return len(wire) == len(encode_frames([big, *later]))

        _run_until(loop, read_some)
        assert wire == encode_frames([big, *later])
    finally:
        device.close()
        network.close()
        loop.close()


def test_a_read_sends_what_it_queued_for_the_guest_at_its_end_without_a_callback(pair) -> None:
    """A guest frame whose answer is queued (an ARP reply; a TCP ACK in bulk) gets it sent at
    the end of the same read: no loop callback of the device's per read."""
    ours, peer = pair
    loop = asyncio.new_event_loop()
    network = Network(StackConfig(), loop)
    device = StreamDevice(loop, network, ours)
    scheduled: list[object] = []
    call_soon = loop.call_soon

    def recording_call_soon(callback, *args, **kwargs):
        scheduled.append(callback)
        return call_soon(callback, *args, **kwargs)

    loop.call_soon = recording_call_soon  # type: ignore[method-assign]
    reader = StreamFramer()
    got: list[bytes] = []

    def answered() -> bool:
        try:
            reader.feed(peer.recv(65536))
        except BlockingIOError:
            pass
        got.extend(_take(reader))
        return len(got) == 2

    try:
        peer.sendall(encode_frames([arp_request(GATEWAY_IP)] * 2))
        _run_until(loop, answered)
        assert all(frame[12:14] == b"\x08\x06" and frame[0:6] == GUEST_MAC for frame in got)
        assert device.counters["rx.sends"] == 1  # both replies in one sendmsg
        assert not [callback for callback in scheduled
                    if getattr(callback, "__self__", None) is device]
    finally:
        device.close()
        network.close()
        loop.close()


def _count_receives(framer: StreamFramer) -> list[int]:
    """Count ``framer.receive`` calls (each is one recv(2)) in the list returned."""
    calls = [0]
    receive = framer.receive

    def counting(fd: int) -> tuple[int, int, int, int]:
        calls[0] += 1
        return receive(fd)

    framer.receive = counting  # type: ignore[method-assign]
    return calls


def test_a_read_that_drains_the_socket_takes_one_recv_even_for_a_largest_frame(pair) -> None:
    ours, peer = pair
    loop = asyncio.new_event_loop()
    network = Network(StackConfig(), loop)
    device = StreamDevice(loop, network, ours)
    receives = _count_receives(device.framer)
    try:
        peer.setblocking(True)
        peer.sendall(encode_frames([_frame(1, MAX_FRAME)]))
        _run_until(loop, lambda: device.counters["tx.frames"] == 1)
        loop.run_until_complete(asyncio.sleep(0.01))
        assert receives == [1]  # no second recv only to see EAGAIN
    finally:
        device.close()
        network.close()
        loop.close()


def test_framer_receive_reads_the_socket_and_indexes_its_frames_in_one_call(pair) -> None:
    ours, peer = pair
    frames = [_frame(n, size) for n, size in enumerate((60, 1514, 9000))]
    last = _frame(9, 1400)
    wire = encode_frames([*frames, last])
    framer = StreamFramer(frames=16)
    peer.sendall(wire[:-700])  # the last frame cut in two
    got, room, count, error = framer.receive(ours.fileno())
    assert (got, count, error) == (len(wire) - 700, 3, 0) and got < room
    assert _frames(framer.batch, count) == frames
    got, _room, count, error = framer.receive(ours.fileno())
    assert (got, count, error) == (0, 0, errno.EAGAIN) and framer.batch.count == 0
    peer.sendall(wire[-700:])
    got, _room, count, error = framer.receive(ours.fileno())
    assert (got, count, error) == (700, 1, 0)
    assert _frames(framer.batch, count) == [last] and framer.buffered == 0
    peer.close()
    got, _room, count, error = framer.receive(ours.fileno())
    assert (got, count, error) == (0, 0, 0)  # the end of the stream


def test_framer_receive_stops_at_a_full_batch_and_at_a_bad_length(pair) -> None:
    ours, peer = pair
    frames = [_frame(n) for n in range(20)]
    framer = StreamFramer(frames=16)
    peer.sendall(encode_frames(frames) + (5).to_bytes(4, "big") + bytes(5))
    _got, _room, count, _error = framer.receive(ours.fileno())
    assert count == 16 and _frames(framer.batch, count) == frames[:16]
    with pytest.raises(StreamError, match="length 5"):
        framer.next_frames()
    assert _frames(framer.batch, framer.batch.count) == frames[16:]


def test_framer_receive_makes_room_for_a_chunk_after_a_partial_frame(pair) -> None:
    ours, peer = pair
    framer = StreamFramer(chunk=4096)
    frame = _frame(1, 1400)
    wire = encode_frames([frame]) * 400  # far more than the buffer: it must be reused
    peer.setblocking(True)
    taken: list[bytes] = []
    for start in range(0, len(wire), 3000):
        peer.sendall(wire[start:start + 3000])
        for _ in range(4):
            got, room, count, error = framer.receive(ours.fileno())
            taken += _frames(framer.batch, count)
            assert room >= 4096 // 4 and not (error and error != errno.EAGAIN)
            if error:
                break
    assert taken == [frame] * 400 and framer.buffered == 0


def test_a_read_that_queues_nothing_back_skips_the_send_path_and_one_that_does_sends(pair) -> None:
    ours, peer = pair
    loop = asyncio.new_event_loop()
    network = Network(StackConfig(), loop)
    network.set_tx_sink(lambda batch, count, now: None)  # guest frames go nowhere, answer none
    device = StreamDevice(loop, network, ours)
    sends = [0]
    flush = device._flush_rx

    def counting_flush() -> None:
        sends[0] += 1
        flush()

    device._flush_rx = counting_flush  # type: ignore[method-assign]
    try:
        peer.sendall(encode_frames([_frame(n) for n in range(3)]))
        _run_until(loop, lambda: device.counters["tx.frames"] == 3)
        assert sends == [0] and device.counters["rx.sends"] == 0
        network.set_tx_sink(None)  # the stack again: an ARP request gets its answer at once
        peer.sendall(encode_frames([arp_request(GATEWAY_IP)]))
        _run_until(loop, lambda: device.counters["rx.frames"] == 1)
        assert sends[0] >= 1
    finally:
        device.close()
        network.close()
        loop.close()
