"""Built UDP batches through a real vhostnet process into the guest's RX ring.

The project's front-end plays QEMU; the host answers a guest flow with more datagrams
than the RX ring has buffers, so the built batch goes in over several pushes: every
datagram arrives once, in order, as the exact frame built by hand.
"""

from __future__ import annotations

import socket
import time

from testkit.frontend import Frontend
from tests.support.daemon import VhostnetProcess, gateway_mac
from tests.support.frames import (
    GATEWAY_IP,
    GATEWAY_MAC,
    GUEST_IP,
    GUEST_MAC,
    eth,
    guest_udp_frame,
    ipv4,
    udp,
)


def test_answers_beyond_the_free_rx_buffers_arrive_in_order_over_several_pushes(
        server: VhostnetProcess) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as host, \
            Frontend(server.socket_path) as frontend:
        host.bind(("127.0.0.1", 0))
        host.settimeout(5)
        port = host.getsockname()[1]
        frontend.connect()
        frontend.start()
        gateway_mac(frontend)
        frontend.send_frame(guest_udp_frame(41000, GATEWAY_IP, port, b"hello"))
        _, flow = host.recvfrom(100)
        count = frontend.rings[0].in_flight + 30  # more than the RX ring has buffers now
        # In groups, each taken off the socket before the next: a loaded machine must not
        # overflow the flow socket's receive buffer before vhostnet reads it.
        for start in range(0, count, 32):
            for i in range(start, min(count, start + 32)):
                host.sendto(b"answer %d" % i, flow)
            deadline = time.monotonic() + 10
            while server.stats().get("udp.fast_path_rx", 0) < min(count, start + 32) \
                    and time.monotonic() < deadline:
                time.sleep(0.01)
        got: list[bytes] = []
        for _ in range(50):  # IPv4 only: a periodic Router Advertisement may come between
            got += [f for f in frontend.receive_frames(timeout=2) if f[12:14] == b"\x08\x00"]
            if len(got) >= count:
                break
        assert got == [eth(GUEST_MAC, GATEWAY_MAC, 0x0800,
                           ipv4(GATEWAY_IP, GUEST_IP, 17,
                                udp(GATEWAY_IP, port, GUEST_IP, 41000, b"answer %d" % i),
                                ident=0))
                       for i in range(count)]
        stats = server.stats()
        assert stats["udp.fast_path_rx"] == count
        # Every storage the ring took whole went back to the pool: later reads reuse them.
        allocated = stats["guest.rx_batches_allocated"]
        assert 0 < allocated <= count // 32 + 1
        for round_ in range(4):
            host.sendto(b"again %d" % round_, flow)
            again: list[bytes] = []
            for _ in range(50):
                again += [f for f in frontend.receive_frames(timeout=2)
                          if f[12:14] == b"\x08\x00"]
                if again:
                    break
            assert [f[42:] for f in again] == [b"again %d" % round_]
        assert server.stats()["guest.rx_batches_allocated"] == allocated
