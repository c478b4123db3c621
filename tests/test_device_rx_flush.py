"""Frames that answer a guest batch (the ARP replies here, a loopback connect's SYN-ACK) go
into the RX ring at the end of the kick that brought the batch: no RX flush is left to a
later loop turn for them (``device.rx.flushes_deferred``, a real vhostnet process)."""

from __future__ import annotations

from testkit.frontend import Frontend
from tests.support.daemon import VhostnetProcess, gateway_mac
from tests.support.frames import GATEWAY_IP, arp_request

REQUESTS = 20


def test_answers_to_a_kick_are_pushed_in_the_same_turn(server: VhostnetProcess) -> None:
    with Frontend(server.socket_path) as frontend:
        frontend.connect()
        frontend.start()
        gateway_mac(frontend)
        before = server.stats()
        for _ in range(REQUESTS):
            frontend.send_frame(arp_request(GATEWAY_IP))
            replies = [f for f in frontend.receive_frames(timeout=5) if f[12:14] == b"\x08\x06"]
            assert len(replies) == 1
        after = server.stats()
    assert after["device.rx.frames"] - before["device.rx.frames"] >= REQUESTS
    # (Router advertisements or other timer frames may still take a deferred flush.)
    assert after["device.rx.flushes_deferred"] - before["device.rx.flushes_deferred"] < 5
