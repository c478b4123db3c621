"""Host -> guest UDP of established flows in C (``UdpFastPath.receive``), real sockets on loopback.

Every frame the kernel builds is compared byte for byte with one built here by the
independent builders of tests/support/frames.py (plain struct packing, a local checksum).
Then the whole trip: a guest datagram through ``Network.receive_batch``, the host's answer
queued for the guest as one ``GuestBatch`` (the stream's sender takes such batches in
place: tests/test_stream.py).
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
import time

import pytest
from vhostnet.hostio._udp_fast import UdpFastPath

from tests.support.frames import (
    GATEWAY_IP,
    GATEWAY_MAC,
    GUEST_IP,
    GUEST_MAC,
    eth,
    guest_udp_frame,
    ipv4,
    udp,
    udp6,
)
from tests.support.loop import run
from tests.support.udp_fast import batch_of
from vhostnet.guest_queue import GuestBatch, new_guest_batch_storage
from vhostnet.network import Network
from vhostnet.stack.config import StackConfig
from vhostnet.virtqueue import FrameBatch

GUEST_IP6 = bytes.fromhex("fec0000000000000000000000000000f")
REMOTE_IP6 = bytes.fromhex("fec00000000000000000000000000002")


def frame_for_guest(remote_ip: bytes, remote_port: int, guest_ip: bytes, guest_port: int,
                    payload: bytes) -> bytes:
    """What the guest must get for ``payload`` from remote_ip:remote_port, built by hand:
    DF set, identification 0 and TTL 64 for IPv4, hop limit 64 for IPv6."""
    if len(guest_ip) == 4:
        return eth(GUEST_MAC, GATEWAY_MAC, 0x0800,
                   ipv4(remote_ip, guest_ip, 17, udp(remote_ip, remote_port, guest_ip,
                                                     guest_port, payload), ident=0))
    segment = udp6(remote_ip, remote_port, guest_ip, guest_port, payload)
    header = struct.pack("!IHBB16s16s", 6 << 28, len(segment), 17, 64, remote_ip, guest_ip)
    return eth(GUEST_MAC, GATEWAY_MAC, 0x86DD, header + segment)


class Flow:
    """A connected flow socket (what UdpGlue opens) and the host peer that answers on it."""

    def __init__(self, family: socket.AddressFamily) -> None:
        host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
        self.peer = socket.socket(family, socket.SOCK_DGRAM)
        self.peer.bind((host, 0))
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.connect(self.peer.getsockname()[:2])
        self.address = self.sock.getsockname()[:2]

    def answer(self, payloads: list[bytes]) -> None:
        for payload in payloads:
            self.peer.sendto(payload, self.address)

    def close(self) -> None:
        self.sock.close()
        self.peer.close()


@pytest.fixture(params=[socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def flow(request):
    try:
        made = Flow(request.param)
    except OSError as error:  # no ::1 in this namespace
        pytest.skip(f"no loopback for {request.param.name}: {error}")
    yield made
    made.close()


def kernel_for(flow: Flow) -> tuple[UdpFastPath, bytes, bytes]:
    """A kernel with ``flow`` registered as id 7 (guest port 4000, remote port 53); the
    guest and remote addresses of the flow's family."""
    kernel = UdpFastPath()
    guest_ip, remote_ip = ((GUEST_IP6, REMOTE_IP6) if flow.sock.family == socket.AF_INET6
                           else (GUEST_IP, GATEWAY_IP))
    assert kernel.add(7, guest_ip, 4000, remote_ip, 53, flow.sock.fileno())
    kernel.set_macs(GATEWAY_MAC, GUEST_MAC)
    return kernel, guest_ip, remote_ip


def receive(kernel: UdpFastPath, mtu: int, batch: FrameBatch) -> tuple[list[bytes], int, list]:
    frames, error, oversized = kernel.receive(7, mtu, *batch.arrays())
    batch.take_written(frames)
    return [bytes(batch.frame(i)) for i in range(frames)], error, oversized


def test_each_datagram_becomes_the_exact_frame_for_the_guest(flow) -> None:
    kernel, guest_ip, remote_ip = kernel_for(flow)
    payloads = [b"", b"x", bytes(range(63)), bytes(range(256)) * 5 + b"odd",
                b"\xff" * 1400]
    flow.answer(payloads)
    frames, error, oversized = receive(kernel, 1500, new_guest_batch_storage(1500))
    assert (error, oversized) == (0, [])
    assert frames == [frame_for_guest(remote_ip, 53, guest_ip, 4000, p) for p in payloads]
    assert kernel.datagrams_received == len(payloads)
    # Drained: a second call finds nothing and says so.
    assert receive(kernel, 1500, new_guest_batch_storage(1500)) == ([], 0, [])


def test_datagram_over_the_mtu_comes_back_whole_for_the_python_stack(flow) -> None:
    kernel, guest_ip, remote_ip = kernel_for(flow)
    header = 28 if flow.sock.family == socket.AF_INET else 48
    fits, too_big = b"a" * (1500 - header), b"b" * (1500 - header + 1)
    flow.answer([fits, too_big, b"after"])
    frames, error, oversized = receive(kernel, 1500, new_guest_batch_storage(1500))
    assert error == 0 and oversized == [too_big]
    assert frames == [frame_for_guest(remote_ip, 53, guest_ip, 4000, p) for p in (fits, b"after")]
    assert len(frames[0]) == 1514


def test_a_batch_takes_no_more_than_it_holds_and_the_rest_waits(flow) -> None:
    kernel, guest_ip, remote_ip = kernel_for(flow)
    payloads = [b"%d" % i for i in range(10)]
    flow.answer(payloads)
    small = FrameBatch(4, 4 * 1514)
    first, error, _ = receive(kernel, 1500, small)
    assert error == 0 and len(first) == 4
    rest, error, _ = receive(kernel, 1500, new_guest_batch_storage(1500))
    assert error == 0
    assert first + rest == [frame_for_guest(remote_ip, 53, guest_ip, 4000, p) for p in payloads]


def test_refused_port_is_reported_as_its_errno() -> None:
    flow = Flow(socket.AF_INET)
    try:
        kernel, _, _ = kernel_for(flow)
        flow.peer.close()  # nobody there: the host answers the next send with ICMP
        flow.sock.send(b"ping")
        frames, error, oversized = receive(kernel, 1500, new_guest_batch_storage(1500))
        assert (frames, error, oversized) == ([], errno.ECONNREFUSED, [])
    finally:
        flow.sock.close()


def test_receive_refuses_unknown_flows_and_batches_too_small_for_the_mtu(flow) -> None:
    kernel, _, _ = kernel_for(flow)
    with pytest.raises(ValueError):
        kernel.receive(8, 1500, *new_guest_batch_storage(1500).arrays())
    with pytest.raises(ValueError):
        kernel.receive(7, 9000, *FrameBatch(4, 4000).arrays())
    kernel.set_macs(GATEWAY_MAC, None)
    with pytest.raises(ValueError):  # no guest MAC: the Python stack's (broadcast) business
        kernel.receive(7, 1500, *new_guest_batch_storage(1500).arrays())


def test_answers_of_an_established_flow_reach_the_guest_as_one_built_batch() -> None:
    async def scenario(loop) -> None:
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
        network = Network(StackConfig(), loop)
        try:
            network.stack.guest_mac = GUEST_MAC
            network.receive_batch(batch_of([(guest_udp_frame(4000, GATEWAY_IP, port, b"q"), 0)]),
                                  1, 0.0)
            network.flush()
            _, peer = server.recvfrom(100)
            network.frames_to_guest.clear()
            before = network.counters()
            answers = [b"answer %d" % i for i in range(5)] + [b"z" * 1473]  # last: fragmented
            for answer in answers:
                server.sendto(answer, peer)
            for _ in range(100):
                await asyncio.sleep(0.01)
                if len(network.frames_to_guest) >= 3:
                    break
            after = network.counters()
            entries = list(network.frames_to_guest)
            assert type(entries[0]) is GuestBatch
            assert entries[0].frames() == [frame_for_guest(GATEWAY_IP, port, GUEST_IP, 4000, a)
                                           for a in answers[:5]]
            # The oversized one follows through the stack, as two fragments.
            assert [type(e) for e in entries[1:]] == [bytes, bytes]
            assert after["udp.fast_path_rx"] - before.get("udp.fast_path_rx", 0) == 5
            assert after["udp.rx_host"] - before.get("udp.rx_host", 0) == 6
            assert after["ipv4.tx"] - before.get("ipv4.tx", 0) == 7
        finally:
            network.close()
            server.close()

    run(scenario)


# --- forwarded ports: datagrams of known peers on an unconnected socket ---------------


def listener(host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((host, 0))
    sock.setblocking(False)
    return sock


def test_known_peers_on_a_forwarded_port_become_frames_and_strangers_stay_for_python() -> None:
    forward = listener("::")  # dual stack, as a forward without an address binds
    known, stranger = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
    try:
        for sock in (known, stranger):
            sock.bind(("127.0.0.1", 0))
        kernel = UdpFastPath()
        kernel.set_macs(GATEWAY_MAC, GUEST_MAC)
        mapped = socket.inet_pton(socket.AF_INET6, "::ffff:127.0.0.1")  # as recvfrom says it
        known_port = known.getsockname()[1]
        assert kernel.add_peer(9, forward.fileno(), mapped, known_port,
                               GUEST_IP, 5000, GATEWAY_IP, known_port)
        assert not kernel.add_peer(10, forward.fileno(), mapped, known_port,
                                   GUEST_IP, 5000, GATEWAY_IP, known_port)  # already there
        target = ("127.0.0.1", forward.getsockname()[1])
        known.sendto(b"one", target)
        stranger.sendto(b"who", target)
        known.sendto(b"two", target)
        batch = new_guest_batch_storage(1500)
        frames, error, hits, left = kernel.receive_from(forward.fileno(), 1500, *batch.arrays())
        batch.take_written(frames)
        assert (frames, error, hits) == (2, 0, [9])
        assert [bytes(batch.frame(i)) for i in range(2)] == [
            frame_for_guest(GATEWAY_IP, known_port, GUEST_IP, 5000, p) for p in (b"one", b"two")]
        assert left == [(b"who", 0, socket.AF_INET6, mapped, stranger.getsockname()[1])]
        # Forgotten: that peer's datagrams are Python's again.
        assert kernel.remove_peer(forward.fileno(), mapped, known_port)
        assert kernel.peer_count == 0
        known.sendto(b"three", target)
        frames, error, hits, left = kernel.receive_from(forward.fileno(), 1500, *batch.arrays())
        assert (frames, hits) == (0, [])
        assert left == [(b"three", 0, socket.AF_INET6, mapped, known_port)]
        # And registered again (the emptied table starts afresh): frames once more.
        assert kernel.add_peer(11, forward.fileno(), mapped, known_port,
                               GUEST_IP, 5000, GATEWAY_IP, known_port)
        known.sendto(b"four", target)
        frames, error, hits, left = kernel.receive_from(forward.fileno(), 1500, *batch.arrays())
        assert (frames, hits, left) == (1, [11], [])
    finally:
        for sock in (forward, known, stranger):
            sock.close()


def test_forwarded_port_datagrams_after_the_first_reach_the_guest_as_built_batches() -> None:
    async def scenario(loop) -> None:
        host_port = listener().getsockname()[1]  # a free port (closed again at once)
        from vhostnet.stack.config import PortForward

        network = Network(StackConfig(udp_forwards=[PortForward("127.0.0.1", host_port, 5000)]),
                          loop)
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(("127.0.0.1", 0))
        peer_port = peer.getsockname()[1]
        try:
            network.stack.guest_mac = GUEST_MAC
            peer.sendto(b"first", ("127.0.0.1", host_port))  # the Python stack makes the flow

            async def settle(entries: int) -> None:
                for _ in range(100):
                    await asyncio.sleep(0.01)
                    if len(network.frames_to_guest) >= entries:
                        return

            await settle(1)
            assert network.frames_to_guest.popleft() == frame_for_guest(
                GATEWAY_IP, peer_port, GUEST_IP, 5000, b"first")
            before = network.counters()
            for i in range(4):
                peer.sendto(b"next %d" % i, ("127.0.0.1", host_port))
            await settle(1)
            after = network.counters()
            entries = list(network.frames_to_guest)
            assert all(type(e) is GuestBatch for e in entries)
            assert [f for e in entries for f in e.frames()] == [
                frame_for_guest(GATEWAY_IP, peer_port, GUEST_IP, 5000, b"next %d" % i)
                for i in range(4)]
            assert after["udp.fast_path_rx"] - before.get("udp.fast_path_rx", 0) == 4
            assert after["udp.rx_forward"] - before["udp.rx_forward"] == 4
            # The flow expires: its peer leaves the kernel with it.
            assert network.udp_fast.kernel.peer_count == 1
            network.poll_timers(time.monotonic() + 10_000.0)
            network.flush()
            assert network.udp_fast.kernel.peer_count == 0
        finally:
            network.close()
            peer.close()

    run(scenario)
