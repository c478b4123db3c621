"""UDP GSO on the fast path's send side (ext/udp_gso.pxi, UdpFastPath.send_batch), with real
sockets on 127.0.0.1 and ::1.

A flow's run of equal-sized datagrams leaves as one message the kernel cuts; what the host's
sockets receive must be exactly the guest's datagrams, in order, with their sizes: across
runs that mix flows, families and sizes, a last shorter datagram, more datagrams than one
message may hold and more bytes than one datagram may carry. A bundle the kernel refuses is
sent datagram by datagram, and the flow is not bundled again.
"""

from __future__ import annotations

import errno
import select
import socket
import time

import numpy as np
import pytest

from tests.support.frames import (
    GATEWAY_IP,
    GATEWAY_MAC,
    GUEST_IP,
    GUEST_IP6,
    GUEST_MAC,
    guest_udp6_frame,
    guest_udp_frame,
)
from tests.support.hostio import free_udp_port
from tests.support.loop import run
from tests.support.udp_fast import batch_of, open_udp_flow, receive_all
from vhostnet.hostio.udp_fast import UdpFastPath  # the C kernel itself
from vhostnet.network import Network
from vhostnet.stack.config import StackConfig, ip6

GATEWAY6 = ip6("fec0::2")
SO_NO_CHECK = getattr(socket, "SO_NO_CHECK", 11)  # Linux: no UDP checksum on send
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux: past rmem_max, as root
SETTLE_SECONDS = 0.2  # a receiver has everything once nothing more came for this long


def listening(family: int) -> socket.socket:
    """A non-blocking host peer on loopback whose buffer holds every datagram of a test."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
    sock.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
    sock.setblocking(False)
    return sock


def payload(tag: int, index: int, size: int) -> bytes:
    """``size`` bytes that tell which datagram they are (the order is checked too)."""
    stamp = b"%d.%d." % (tag, index)
    return (stamp * (size // len(stamp) + 1))[:size]


class Flows:
    """A kernel with flows registered on connected host sockets, each toward its own receiver."""

    def __init__(self) -> None:
        if not UdpFastPath().gso:
            pytest.skip("this kernel has no UDP_SEGMENT")
        self.kernel = UdpFastPath()
        self.kernel.set_macs(GATEWAY_MAC, GUEST_MAC)
        self.sockets: list[socket.socket] = []
        self.receivers: dict[int, socket.socket] = {}   # flow id -> the host peer
        self.frames: dict[int, object] = {}             # flow id -> frame builder

    def add(self, flow_id: int, family: int, guest_port: int = 4000) -> socket.socket:
        """Flow ``flow_id`` from the guest's ``guest_port`` to its own receiver's port;
        returns the flow's host socket."""
        receiver = listening(family)
        self.sockets.append(receiver)
        host, port = receiver.getsockname()[:2]
        sender = socket.socket(family, socket.SOCK_DGRAM)
        self.sockets.append(sender)
        sender.connect((host, port))
        if family == socket.AF_INET6:
            assert self.kernel.add(flow_id, GUEST_IP6, guest_port, GATEWAY6, port,
                                   sender.fileno())
            self.frames[flow_id] = lambda data: guest_udp6_frame(guest_port, GATEWAY6, port, data)
        else:
            assert self.kernel.add(flow_id, GUEST_IP, guest_port, GATEWAY_IP, port,
                                   sender.fileno())
            self.frames[flow_id] = lambda data: guest_udp_frame(guest_port, GATEWAY_IP, port, data)
        self.receivers[flow_id] = receiver
        return sender

    def send(self, datagrams: list[tuple[int, bytes]]) -> int:
        """(flow id, payload) in the guest's order, as one TX batch; how many were taken."""
        batch = batch_of([(self.frames[flow_id](data), 0) for flow_id, data in datagrams],
                         capacity=len(datagrams))
        handled = np.zeros(batch.count, dtype=np.uint8)
        taken = self.kernel.send_batch(*batch.arrays(), handled, batch.count)
        assert handled.tolist() == [1] * taken + [0] * (batch.count - taken)
        return taken

    def received(self, flow_id: int) -> list[bytes]:
        """Every datagram the flow's receiver got. Loopback delivers through the CPU's
        backlog, which a loaded machine may work off later (ksoftirqd): read until nothing
        more comes for SETTLE_SECONDS."""
        receiver = self.receivers[flow_id]
        got = receive_all(receiver, limit=10_000)
        for _ in range(100):
            if not select.select([receiver], [], [], SETTLE_SECONDS)[0]:
                break
            got += receive_all(receiver, limit=10_000)
        return got

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def flows():
    made = Flows()
    yield made
    made.close()


def mixed_runs() -> list[tuple[int, bytes]]:
    """Flow 1 (IPv4), flow 2 (IPv6), flow 3 (IPv4): runs longer than a message may hold,
    heavier than a datagram may be, with shorter last datagrams, empty ones, interleaved."""
    sizes = {
        1: [200] * 150 + [120] + [200] * 3,             # > 64 of one size, a shorter one
        2: [4000] * 40 + [3999, 1, 1],                  # > 65507 bytes of one size
        3: [0, 0, 7, 1472, 1472, 1000, 1472, 1],        # empty, shorter then longer again
    }
    datagrams = [(flow_id, payload(flow_id, i, size))
                 for flow_id, run in sizes.items() for i, size in enumerate(run)]
    # The flows take turns for a while, then each has a long run of its own.
    turns = [(1, payload(1, 1000 + i, 200)) if i % 3 == 0
             else (2, payload(2, 1000 + i, 300)) if i % 3 == 1
             else (3, payload(3, 1000 + i, 200)) for i in range(30)]
    return turns + datagrams


def test_bundled_runs_arrive_exactly_as_the_guest_sent_them(flows: Flows) -> None:
    flows.add(1, socket.AF_INET)
    flows.add(2, socket.AF_INET6)
    flows.add(3, socket.AF_INET, guest_port=4001)
    datagrams = mixed_runs()
    assert flows.send(datagrams) == len(datagrams)
    kernel = flows.kernel
    for flow_id in (1, 2, 3):
        sent = [data for flow, data in datagrams if flow == flow_id]
        got = flows.received(flow_id)
        assert [len(d) for d in got] == [len(d) for d in sent]
        assert got == sent
    assert kernel.datagrams_sent == len(datagrams)
    assert kernel.last_taken6 == sum(1 for flow, _ in datagrams if flow == 2)
    # Most went in bundles: all but the lone ones of the turns and flow 3's odd sizes.
    assert kernel.gso_datagrams > len(datagrams) - 40
    assert kernel.gso_refused == 0
    assert sorted(kernel.take_activity()) == [
        (flow_id, sum(1 for f, _ in datagrams if f == flow_id),
         sum(len(d) for f, d in datagrams if f == flow_id)) for flow_id in (1, 2, 3)]
    assert kernel.take_errors() == []


def test_without_gso_the_same_datagrams_go_one_by_one(flows: Flows) -> None:
    flows.add(1, socket.AF_INET)
    flows.add(2, socket.AF_INET6)
    flows.kernel.gso = False
    datagrams = [(1 + i % 2, payload(1, i, 500)) for i in range(20)] \
        + [(1, payload(1, 100 + i, 500)) for i in range(70)]
    assert flows.send(datagrams) == len(datagrams)
    assert flows.received(1) == [d for f, d in datagrams if f == 1]
    assert flows.received(2) == [d for f, d in datagrams if f == 2]
    assert flows.kernel.gso_datagrams == 0
    flows.kernel.gso = True
    assert flows.send(datagrams[-70:]) == 70
    assert flows.received(1) == [d for _, d in datagrams[-70:]]
    assert flows.kernel.gso_datagrams == 70


def test_a_refused_bundle_goes_datagram_by_datagram_and_the_flow_stays_plain(
        flows: Flows) -> None:
    # A socket that sends no UDP checksums cannot have its datagrams cut (EINVAL).
    plain = flows.add(1, socket.AF_INET)
    plain.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
    flows.add(2, socket.AF_INET, guest_port=4001)
    datagrams = [(1, payload(1, i, 300)) for i in range(10)] \
        + [(2, payload(2, i, 300)) for i in range(10)] + [(1, payload(1, 10, 300))]
    assert flows.send(datagrams) == len(datagrams)
    assert flows.received(1) == [d for f, d in datagrams if f == 1]
    assert flows.received(2) == [d for f, d in datagrams if f == 2]
    kernel = flows.kernel
    assert kernel.gso_refused == 1
    assert kernel.gso_datagrams == 10            # flow 2's
    assert kernel.datagrams_sent == len(datagrams)
    assert kernel.take_errors() == []
    assert sorted(kernel.take_activity()) == [(1, 11, 11 * 300), (2, 10, 10 * 300)]
    later = [(1, payload(1, 20 + i, 300)) for i in range(10)]
    assert flows.send(later) == 10
    assert flows.received(1) == [d for _, d in later]
    assert kernel.gso_refused == 1               # not tried again
    assert kernel.gso_datagrams == 10


def test_a_pending_refusal_taken_by_a_bundle_reaches_the_flow_once(flows: Flows) -> None:
    sender = flows.add(1, socket.AF_INET)
    port = free_udp_port()
    sender.connect(("127.0.0.1", port))  # nobody there: the host answers port unreachable
    flows.kernel.remove(1)
    assert flows.kernel.add(1, GUEST_IP, 4000, GATEWAY_IP, port, sender.fileno())
    flows.frames[1] = lambda data: guest_udp_frame(4000, GATEWAY_IP, port, data)
    sender.send(b"probe")
    time.sleep(0.05)  # the ICMP error is pending on the socket now
    # The bundle takes the error: its first datagram is lost with it, the second goes alone.
    assert flows.send([(1, payload(1, i, 100)) for i in range(2)]) == 2
    assert flows.kernel.take_errors() == [(1, errno.ECONNREFUSED)]
    assert flows.kernel.datagrams_sent == 1
    assert flows.kernel.take_activity() == [(1, 1, 100)]


def test_bundles_are_counted_through_the_network() -> None:
    async def scenario(loop) -> None:
        server = listening(socket.AF_INET)
        port = server.getsockname()[1]
        network = Network(StackConfig(), loop)
        try:
            open_udp_flow(network, port)
            assert network.udp_fast is not None and network.udp_fast.kernel.gso
            sent = [payload(1, i, 1000) for i in range(100)]
            batch = batch_of([(guest_udp_frame(4000, GATEWAY_IP, port, d), 0) for d in sent],
                             capacity=100)
            before = network.counters()
            network.receive_batch(batch, batch.count, 1.0)
            after = network.counters()
            assert receive_all(server, limit=1000) == [b"a"] + sent
            assert after["udp.fast_path"] - before.get("udp.fast_path", 0) == 100
            assert after["udp.gso_datagrams"] - before.get("udp.gso_datagrams", 0) == 100
            assert "udp.gso_refused" not in after
        finally:
            network.close()
            server.close()

    run(scenario)
