"""The baseline client: the guest's roles played host to host over loopback, in its own process.

Same line protocol and reply fields as ``guest.py``, so every case measures
the baseline with the runner's code path unchanged: only the process at the
other end differs.
"""

from __future__ import annotations

import hashlib
import socket
import sys
import time
from typing import Any

import numpy as np

from bench.runner import latency_reply, serve_json_lines


def op_udp_tx(payload: int, port: int, duration: float) -> dict[str, Any]:
    data = bytes(i & 0xFF for i in range(payload))
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sendto, address = sock.sendto, ("127.0.0.1", port)
        start = time.monotonic()
        stop = start + duration
        while time.monotonic() < stop:
            for _ in range(64):
                try:
                    sendto(data, address)
                    sent += 1
                except OSError:
                    time.sleep(0.0001)
        time.sleep(0.05)  # let the sink take what is in flight
        return {"frames": sent, "seconds": time.monotonic() - start - 0.05}


def op_tcp_tx(port: int, duration: float | None = None, limit: int | None = None,
              seed: int = 1, mss: int = 65536) -> dict[str, Any]:
    block = np.random.default_rng(seed).integers(0, 256, 1460, dtype=np.uint8).tobytes()
    chunk = block * 180
    digest = hashlib.sha256()
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=5.0) as sock:
        start = time.monotonic()
        stop = start + (duration or 60.0)
        while time.monotonic() < stop and (limit is None or sent < limit):
            offset = sent % len(block)
            view = memoryview(chunk)[offset:]
            if limit is not None:
                view = view[: limit - sent]
            n = sock.send(view)
            digest.update(view[:n])
            sent += n
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass
        elapsed = time.monotonic() - start
    return {"bytes": sent, "seconds": elapsed, "sha256": digest.hexdigest(), "clean_close": True}


def _transact(sock: socket.socket) -> float:
    start = time.perf_counter()
    sock.send(b"x")
    if not sock.recv(1):
        raise ConnectionError("echo server closed")
    return time.perf_counter() - start


def op_tcp_rr(port: int, duration: float, max_count: int = 1_000_000) -> dict[str, Any]:
    latencies = []
    with socket.create_connection(("127.0.0.1", port), timeout=5.0) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stop = time.monotonic() + duration
        while time.monotonic() < stop and len(latencies) < max_count:
            latencies.append(_transact(sock))
    return latency_reply(latencies, duration)


def op_udp_rr(port: int, duration: float, payload: int = 64,
              max_count: int = 1_000_000) -> dict[str, Any]:
    """One datagram of ``payload`` bytes to the echo server, wait for it back; again."""
    data = bytes(i & 0xFF for i in range(payload))
    latencies = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2.0)
        sock.connect(("127.0.0.1", port))
        stop = time.monotonic() + duration
        while time.monotonic() < stop and len(latencies) < max_count:
            start = time.perf_counter()
            sock.send(data)
            sock.recv(65536)
            latencies.append(time.perf_counter() - start)
    return latency_reply(latencies, duration)


def op_tcp_crr(port: int, duration: float, max_count: int = 1_000_000) -> dict[str, Any]:
    done = 0
    start = time.monotonic()
    stop = start + duration
    while time.monotonic() < stop and done < max_count:
        with socket.create_connection(("127.0.0.1", port), timeout=5.0) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _transact(sock)
            sock.shutdown(socket.SHUT_WR)
            sock.recv(1)
        done += 1
    return {"count": done, "seconds": time.monotonic() - start}


def serve() -> int:
    serve_json_lines(lambda op, arguments: globals()[f"op_{op}"](**arguments), (OSError, KeyError))
    return 0


if __name__ == "__main__":
    sys.exit(serve())
