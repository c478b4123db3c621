"""The real vhostnet process with a packed-ring guest (the test front-end with ``packed=True``).

Frames cross packed rings both ways through the stack, around the ring many times
(wrap counters flip), merged RX buffers for the larger echoes; the bases handed back
by GET_VRING_BASE carry both positions with their wrap counters, and a reconnect
resumes from them.
"""

from __future__ import annotations

import pytest

from testkit.frontend import Frontend
from testkit.packed_ring import FRESH_BASE
from tests.support.daemon import VhostnetProcess, echo_request, gateway_mac

QUEUE_SIZE = 64


def echo(frontend: Frontend, mac: bytes, payload: bytes, seq: int) -> None:
    frontend.send_frame(echo_request(mac, payload, seq))
    replies = frontend.receive_frames(timeout=5)
    assert len(replies) == 1
    assert replies[0][23] == 1 and replies[0][34] == 0  # ICMP echo reply
    assert replies[0][42:] == payload


# An MTU above the largest echo: its reply must come whole (not fragmented) to take two
# merged RX buffers.
@pytest.mark.parametrize("server", [("-m", "9000")], indirect=True)
def test_packed_rings_carry_frames_both_ways_around_the_ring(server: VhostnetProcess) -> None:
    with Frontend(server.socket_path, queue_size=QUEUE_SIZE, packed=True) as frontend:
        frontend.connect()
        frontend.start()
        assert frontend.packed
        mac = gateway_mac(frontend)
        sizes = [8, 1000, 3000] * 60  # 3000 bytes take two RX buffers (MRG_RXBUF)
        for seq, size in enumerate(sizes, start=1):
            echo(frontend, mac, bytes((seq + i) & 0xFF for i in range(size)), seq)
        stats = server.stats()
        assert stats["device.tx.frames"] == len(sizes) + 1
        assert stats["device.rx.frames"] == len(sizes) + 1
        assert not any(stats[f"vq{q}.{reason}"] for q in (0, 1)
                       for reason in ("address_unmapped", "wrong_direction",
                                      "packed_chain_not_available", "head_out_of_range"))
        tx_ring = frontend.tx
        bases = frontend.stop()
        # Every TX chain was completed: avail and used positions agree, wrap counters too.
        assert bases[1] & 0xFFFF == tx_ring.position(tx_ring.avail_idx)
        assert bases[1] & 0xFFFF == bases[1] >> 16
        assert bases[1] != FRESH_BASE


def test_packed_rings_resume_from_returned_bases(server: VhostnetProcess) -> None:
    with Frontend(server.socket_path, queue_size=QUEUE_SIZE, packed=True) as frontend:
        frontend.connect()
        frontend.start()
        mac = gateway_mac(frontend)
        for seq in range(1, 80):
            echo(frontend, mac, b"lap %d" % seq, seq)
        bases = frontend.stop()
    with Frontend(server.socket_path, queue_size=QUEUE_SIZE, packed=True) as frontend:
        frontend.connect()
        frontend.start(bases=(bases[0], bases[1]))
        mac = gateway_mac(frontend)
        echo(frontend, mac, b"again", 200)
        running = server.stats()
        assert running["vq1.at.last_avail"] == frontend.tx.position(frontend.tx.avail_idx)
        assert frontend.stop()[1] & 0xFFFF == frontend.tx.position(frontend.tx.avail_idx)
