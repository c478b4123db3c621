"""The benchmark sink's recvmmsg receiver counts every datagram and byte exactly, and a
wait with nothing to read ends at its timeout."""

from __future__ import annotations

import socket
import time

from bench.hostside import UdpSink
from bench.mmsg import BatchReceiver


def test_batches_count_every_datagram_and_byte() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        server.bind(("127.0.0.1", 0))
        receiver = BatchReceiver(server, timeout=0.2, batch=16, size=2048)
        sizes = [1 + (i * 37) % 1500 for i in range(100)]
        for size in sizes:
            client.sendto(bytes(size), server.getsockname())
        packets = total = calls = 0
        while packets < len(sizes) and calls < 50:
            got, size = receiver.receive()
            packets, total, calls = packets + got, total + size, calls + 1
        assert (packets, total) == (len(sizes), sum(sizes))
        assert calls >= len(sizes) // 16  # at most 16 per call: the batch is respected
        started = time.monotonic()
        assert receiver.receive() == (0, 0)
        assert 0.1 < time.monotonic() - started < 2.0


def test_the_sink_counts_through_batches_and_stops() -> None:
    sink = UdpSink()
    sink.start()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            for i in range(300):
                client.sendto(bytes(10 + i), ("127.0.0.1", sink.port))
        deadline = time.monotonic() + 5
        while sink.packets < 300 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sink.take() == (300, sum(10 + i for i in range(300)))
    finally:
        sink.stop()
    assert not sink.thread.is_alive() and sink.error is None
