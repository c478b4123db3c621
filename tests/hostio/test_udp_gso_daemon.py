"""UDP GSO in a real vhostnet process (sandboxed: seccomp, no privileges), fed by a front-end
that publishes many TX frames at once, so the back-end drains them as one batch.

The run of one flow's equal-sized datagrams leaves in bundles the kernel cuts (the sandbox
lets UDP_SEGMENT through), and the host's socket receives each datagram as the guest sent it,
in order.
"""

from __future__ import annotations

import socket
import time

from bench.rings import GuestRings
from tests.support.daemon import VhostnetProcess
from tests.support.frames import GATEWAY_IP, guest_udp_frame
from tests.support.udp_fast import receive_all

RUN = 100


def test_a_published_run_goes_in_bundles_and_arrives_intact(server: VhostnetProcess) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as host, \
            GuestRings(server.socket_path) as guest:
        host.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        host.bind(("127.0.0.1", 0))
        host.settimeout(5)
        port = host.getsockname()[1]
        guest.send_frames([guest_udp_frame(41000, GATEWAY_IP, port, b"hello")])
        assert host.recv(100) == b"hello"  # the flow and its host socket exist now
        sent = [b"%04d" % i * 100 for i in range(RUN)]
        guest.send_frames([guest_udp_frame(41000, GATEWAY_IP, port, data) for data in sent])
        host.setblocking(False)
        got: list[bytes] = []
        deadline = time.monotonic() + 10
        while len(got) < RUN and time.monotonic() < deadline:
            got += receive_all(host, limit=RUN)
            time.sleep(0.01)
        assert got == sent
        stats = server.stats()
        assert stats["udp.fast_path"] == RUN
        assert stats["udp.gso_datagrams"] >= RUN // 2  # the batch may be split in two drains
        assert "udp.gso_refused" not in stats
