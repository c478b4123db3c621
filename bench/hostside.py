"""The host's side of the benchmarks: sinks, senders and an echo server on 127.0.0.1.

Each runs in a thread of the runner process; the load comes from a separate
process (the benchmark guest or the loopback baseline client), so these
threads only see their own sockets. Every thread stops on an event and every
blocking call has a timeout.
"""

from __future__ import annotations

import hashlib
import selectors
import socket
import threading
import time

from bench.mmsg import BatchReceiver

SOCKET_TIMEOUT = 0.2
UDP_RCVBUF = 8 << 20


class _Worker:
    def __init__(self) -> None:
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.stop_event.set()
        self.thread.join(timeout)

    def _run(self) -> None:
        try:
            self.run()
        except BaseException as exc:  # reported by the runner, not lost in a thread
            self.error = exc

    def run(self) -> None:
        raise NotImplementedError


class UdpSink(_Worker):
    """Counts datagrams arriving on a UDP port; ``echo``: sends each one back."""

    def __init__(self, echo: bool = False) -> None:
        super().__init__()
        self.echo = echo
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(SOCKET_TIMEOUT)
        self.port = self.sock.getsockname()[1]
        self.packets = 0
        self.bytes = 0

    def take(self) -> tuple[int, int]:
        """Datagrams and bytes since the last call."""
        packets, size = self.packets, self.bytes
        self.packets = self.bytes = 0
        return packets, size

    def run(self) -> None:
        if not self.echo:
            self._count_batches()
            return
        recvfrom_into = self.sock.recvfrom_into
        buf = bytearray(65536)
        while not self.stop_event.is_set():
            try:
                n, sender = recvfrom_into(buf)
            except TimeoutError:
                continue
            if self.echo:
                self.sock.sendto(memoryview(buf)[:n], sender)
            self.packets += 1
            self.bytes += n
        self.sock.close()

    def _count_batches(self) -> None:
        """Counting only: many datagrams per system call (``bench.mmsg``), so that the sink
        is not what the throughput cases measure."""
        receiver = BatchReceiver(self.sock, SOCKET_TIMEOUT)
        while not self.stop_event.is_set():
            packets, size = receiver.receive()
            self.packets += packets
            self.bytes += size
        self.sock.close()


class UdpSender(_Worker):
    """Sends datagrams of ``payload`` bytes to 127.0.0.1:``port`` until stopped or ``duration``."""

    def __init__(self, port: int, payload: int, duration: float) -> None:
        super().__init__()
        self.address = ("127.0.0.1", port)
        self.data = bytes(i & 0xFF for i in range(payload))
        self.duration = duration
        self.sent = 0

    def run(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sendto, data, address = sock.sendto, self.data, self.address
            stop = time.monotonic() + self.duration
            while not self.stop_event.is_set():
                for _ in range(64):
                    try:
                        sendto(data, address)
                        self.sent += 1
                    except OSError:  # ENOBUFS under load: back off a little
                        time.sleep(0.0001)
                if time.monotonic() > stop:
                    break


class TcpSink(_Worker):
    """Accepts connections one after another and reads each to EOF: bytes and sha256 per connection."""

    def __init__(self) -> None:
        super().__init__()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(SOCKET_TIMEOUT)
        self.port = self.listener.getsockname()[1]
        self.results: list[dict[str, object]] = []

    def run(self) -> None:
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while not self.stop_event.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            digest = hashlib.sha256()
            total = 0
            conn.settimeout(SOCKET_TIMEOUT)
            with conn:
                while not self.stop_event.is_set():
                    try:
                        n = conn.recv_into(buf)
                    except TimeoutError:
                        continue
                    except OSError:
                        break
                    if not n:
                        break
                    digest.update(view[:n])
                    total += n
            self.results.append({"bytes": total, "sha256": digest.hexdigest()})
        self.listener.close()


class TcpSender(_Worker):
    """Connects to 127.0.0.1:``port`` and sends ``block`` repeated for ``duration`` seconds, then
    closes. The receiver checks the bytes against the block (no hash here: at 1 GB/s hashing
    took most of a core from the machine the back-end runs on)."""

    def __init__(self, port: int, duration: float, block: bytes) -> None:
        super().__init__()
        self.port = port
        self.duration = duration
        self.chunk = block * max(1, (256 << 10) // len(block))
        self.block_len = len(block)
        self.sent = 0

    def run(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5.0) as sock:
            stop = time.monotonic() + self.duration
            chunk = memoryview(self.chunk)
            while time.monotonic() < stop and not self.stop_event.is_set():
                n = sock.send(chunk)
                self.sent += n
                # Keep the stream `block` repeated whatever the partial sends.
                offset = self.sent % self.block_len
                chunk = memoryview(self.chunk)[offset:]
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(10.0)
            try:
                while sock.recv(65536):
                    pass
            except OSError:
                pass


class TcpEcho(_Worker):
    """Answers every byte with one byte, on any number of connections; closes on EOF."""

    def __init__(self) -> None:
        super().__init__()
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.connections = 0

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ, None)
        while not self.stop_event.is_set():
            for key, _ in sel.select(SOCKET_TIMEOUT):
                if key.data is None:
                    try:
                        conn, _ = self.listener.accept()
                    except BlockingIOError:
                        continue
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ, True)
                    self.connections += 1
                    continue
                conn = key.fileobj
                try:
                    data = conn.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    conn.send(data[-1:] * len(data))
                else:
                    sel.unregister(conn)
                    conn.close()
        for key in list(sel.get_map().values()):
            key.fileobj.close()
        sel.close()
