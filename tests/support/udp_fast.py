"""Driving the UDP fast path with hand-made batches."""

from __future__ import annotations

import socket

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
