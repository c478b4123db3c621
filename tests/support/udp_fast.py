"""Driving the UDP fast path with hand-made batches."""

from __future__ import annotations

import socket

from tests.support.frames import GATEWAY_IP, guest_udp_frame
from vhostnet.virtqueue import FrameBatch


def batch_of(frames: list[tuple[bytes, int]], capacity: int = 64) -> FrameBatch:
    batch = FrameBatch(capacity, 1 << 20)
    for frame, vnet in frames:
        assert batch.append(frame, vnet)
    return batch


def receive_all(sock: socket.socket, limit: int = 100) -> list[bytes]:
    got = []
    for _ in range(limit):
        try:
            got.append(sock.recv(65535))
        except BlockingIOError:
            break
    return got


def open_udp_flow(network, port: int, guest_port: int = 4000) -> None:
    """The guest sends one datagram from ``guest_port`` to the gateway's ``port``: UDP NAT
    opens the flow and registers it with the fast path (``network``: a ``Network``)."""
    network.receive_batch(batch_of([(guest_udp_frame(guest_port, GATEWAY_IP, port, b"a"), 0)]),
                          1, 0.0)
    network.flush()
