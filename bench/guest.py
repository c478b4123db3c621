"""The benchmark guest: a separate process that plays QEMU plus a guest against a back-end.

Run as ``python -m bench.guest SOCKET QUEUE_SIZE BUF_BYTES MSS``. It
reads one JSON command per line on stdin and answers each with one JSON line
on stdout, so the runner measures the back-end from outside its process, as
QEMU's vCPU threads would load it. Every loop ends by count or by time.
"""

from __future__ import annotations

import hashlib
import struct
import sys
import time
from typing import Any

from bench.guest_net import GATEWAY_IP, GUEST_MAC, GuestNet, GuestTcp, Listener, bulk_block
from bench.rings import GuestRings
from bench.runner import latency_reply, serve_json_lines

# An ethertype no stack handles (IEEE local experimental): if a back-end
# without a discarding sink gets the ring case, its stack drops these cheaply.
ETH_EXPERIMENTAL = 0x88B5
DRAIN_TIMEOUT = 2.0
GUEST_UDP_PORT = 33000


class Guest:
    def __init__(self, rings: GuestRings, mss: int) -> None:
        self.rings = rings
        self.net = GuestNet(rings)
        self.mss = mss
        self.next_port = 20000
        self.next_udp_port = 1023

    def _port(self) -> int:
        self.next_port = 20000 + (self.next_port - 19999) % 40000
        return self.next_port

    # ---- frame blasting (ring, udp-tx) ------------------------------------------

    def _blast(self, frame: bytes, duration: float) -> dict[str, Any]:
        """Keep the TX ring full of ``frame`` for ``duration`` seconds; count completions."""
        net, tx = self.net, self.rings.tx
        net.flush()
        self.rings.reclaim_tx()
        self.rings.fill_tx_all(frame)
        done = 0
        start = time.monotonic()
        stop = start + duration
        while True:
            _, count = tx.consume_used()
            done += count
            if time.monotonic() >= stop:
                break
            free = tx.free
            if free:
                tx.expose(free)
            else:
                tx.wait_for_room(0.01)
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while tx.in_flight and time.monotonic() < deadline:
            tx.wait(0.01)
            done += tx.consume_used()[1]
        elapsed = time.monotonic() - start
        return {"frames": done, "seconds": elapsed, "lost_in_ring": tx.in_flight}

    def op_ring(self, size: int, duration: float) -> dict[str, Any]:
        frame = struct.pack("!6s6sH", self.net.gateway_mac, GUEST_MAC, ETH_EXPERIMENTAL)
        frame += bytes(range(256)) * (size // 256 + 1)
        return self._blast(frame[:size], duration)

    def op_udp_tx(self, payload: int, port: int, duration: float) -> dict[str, Any]:
        data = bytes(i & 0xFF for i in range(payload))
        return self._blast(self.net.udp_frame(GATEWAY_IP, GUEST_UDP_PORT, port, data), duration)

    def op_udp_rx(self, duration: float, wait: float = 5.0) -> dict[str, Any]:
        """Count frames arriving on RX for ``duration`` seconds from the first one."""
        frames = total = 0
        first = 0.0
        deadline = time.monotonic() + wait
        rx = self.rings.rx
        while True:
            count, size = self.rings.receive_counts()
            now = time.monotonic()
            if count:
                if not first:
                    first = now
                frames += count
                total += size
            if first and now - first >= duration:
                break
            if not first and now > deadline:
                break
            if not count:
                rx.wait(0.01)
        return {"frames": frames, "bytes": total, "seconds": (time.monotonic() - first) if first else 0.0}

    # ---- TCP -----------------------------------------------------------------------

    def _run_until(self, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                return False
            self.net.poll(0.005)
        return True

    def _connect(self, port: int, timeout: float = 3.0) -> GuestTcp:
        conn = GuestTcp(self.net, self._port(), GATEWAY_IP, port, self.mss)
        conn.connect()
        self.net.flush()
        if not self._run_until(lambda: conn.established or conn.reset, timeout) or conn.reset:
            conn.forget()
            raise TimeoutError(f"TCP connect to the gateway port {port} failed")
        return conn

    def op_tcp_tx(self, port: int, duration: float | None = None, limit: int | None = None,
                  seed: int = 1) -> dict[str, Any]:
        """Bulk send to the host for ``duration`` seconds (or ``limit`` bytes), then close."""
        block = bulk_block(seed, self.mss)
        conn = self._connect(port)
        start = time.monotonic()
        conn.set_bulk(block, limit, close=limit is not None)
        stop = start + duration if duration else start + 60.0
        self._run_until(lambda: conn.fin_sent or time.monotonic() >= stop, 120.0)
        if not conn.fin_sent:
            conn.stop_bulk()
        ok = self._run_until(lambda: conn.done, 10.0)
        elapsed = time.monotonic() - start
        sent = conn.snd_una - 2 if conn.fin_sent and conn.snd_una == conn.snd_nxt else conn.snd_una - 1
        conn.forget()
        digest = _repeated_digest(block, sent)
        return {"bytes": sent, "seconds": elapsed, "sha256": digest, "clean_close": ok}

    def op_tcp_rx(self, port: int, seed: int, block_len: int, wait: float = 60.0) -> dict[str, Any]:
        """Accept one connection on ``port`` and take everything until the peer's FIN; the
        stream must be ``bulk_block(seed, block_len)`` repeated (``intact`` in the reply)."""
        listener = Listener(self.net, port, self.mss, bulk_block(seed, block_len))
        ok = self._run_until(lambda: port in self.net.connections, 5.0)
        if not ok:
            del self.net.listening[port]
            raise TimeoutError("no connection arrived for tcp-rx")
        conn = self.net.connections[port]
        self._run_until(lambda: conn.peer_fin or conn.reset, wait)
        conn.close()
        clean = self._run_until(lambda: conn.done, 5.0)
        conn.forget()
        del self.net.listening[listener.port]
        seconds = conn.last_data_at - conn.first_data_at
        return {"bytes": conn.received, "seconds": seconds, "intact": conn.intact,
                "clean_close": clean}

    def _transact(self, conn: GuestTcp, timeout: float = 2.0) -> float:
        before = conn.received
        start = time.perf_counter()
        conn.send_bytes(b"x")
        self.net.flush()
        if not self._run_until(lambda: conn.received > before or conn.reset, timeout) or conn.reset:
            raise TimeoutError("no response to a 1-byte request")
        return time.perf_counter() - start

    def op_tcp_rr(self, port: int, duration: float, max_count: int = 1_000_000) -> dict[str, Any]:
        conn = self._connect(port)
        latencies = []
        stop = time.monotonic() + duration
        while time.monotonic() < stop and len(latencies) < max_count:
            latencies.append(self._transact(conn))
        conn.close()
        self._run_until(lambda: conn.done, 2.0)
        conn.forget()
        return latency_reply(latencies, duration)

    # ---- UDP request/response ----------------------------------------------------------

    def op_udp_rr(self, port: int, duration: float, payload: int = 64,
                  max_count: int = 1_000_000) -> dict[str, Any]:
        """One datagram of ``payload`` bytes to the gateway's ``port`` (the host's echo
        server), wait until a datagram comes back; again, for ``duration`` seconds."""
        data = bytes(i & 0xFF for i in range(payload))
        frame = self.net.udp_frame(GATEWAY_IP, GUEST_UDP_PORT + 1, port, data)
        latencies = []
        net = self.net
        stop = time.monotonic() + duration
        while time.monotonic() < stop and len(latencies) < max_count:
            before = net.udp_received
            start = time.perf_counter()
            net.send_frame(frame)
            net.flush()
            if not self._run_until(lambda before=before: net.udp_received > before, 2.0):
                raise TimeoutError("no answer to a UDP request")
            latencies.append(time.perf_counter() - start)
        return latency_reply(latencies, duration)

    def _connect_request_close(self, port: int) -> None:
        conn = self._connect(port)
        self._transact(conn)
        conn.close()
        self.net.flush()
        self._run_until(lambda: conn.done, 2.0)
        conn.forget()

    def op_tcp_crr(self, port: int, duration: float, max_count: int = 1_000_000) -> dict[str, Any]:
        done = 0
        start = time.monotonic()
        stop = start + duration
        while time.monotonic() < stop and done < max_count:
            self._connect_request_close(port)
            done += 1
        return {"count": done, "seconds": time.monotonic() - start}

    # ---- soak: many short flows ------------------------------------------------------

    def op_soak(self, tcp_port: int, tcp_count: int, udp_port: int, udp_count: int,
                duration: float) -> dict[str, Any]:
        """Open and close ``tcp_count`` TCP connections (connect, 1-byte request and
        answer, close) and send one datagram from each of ``udp_count`` new UDP source
        ports (flows the back-end expires), spread over ``duration`` seconds; what was done
        by then."""
        start = time.monotonic()
        stop = start + duration
        tcp = udp = failed = 0
        replies = self.net.udp_received
        while (tcp < tcp_count or udp < udp_count) and time.monotonic() < stop:
            # Keep pace: each kind at its share of the slice.
            due = min(1.0, (time.monotonic() - start) / duration)
            while udp < udp_count and udp <= due * udp_count:
                self.next_udp_port = 1024 + (self.next_udp_port - 1023) % 60000
                self.net.send_frame(self.net.udp_frame(GATEWAY_IP, self.next_udp_port,
                                                       udp_port, b"soak"))
                udp += 1
            self.net.flush()
            if tcp < tcp_count and tcp <= due * tcp_count:
                try:
                    self._connect_request_close(tcp_port)
                except TimeoutError:
                    failed += 1
                tcp += 1
            else:
                self.net.poll(0.005)
        self._run_until(lambda: self.net.udp_received - replies >= udp, 1.0)
        return {"tcp": tcp, "tcp_failed": failed, "udp": udp,
                "udp_replies": self.net.udp_received - replies,
                "seconds": time.monotonic() - start}


def serve(argv: list[str]) -> int:
    socket_path, queue_size, buf_bytes, mss = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    offload = argv[5:6] == ["offload"]
    packed = argv[6:7] == ["packed"]
    with GuestRings(socket_path, queue_size=queue_size, tx_buf=buf_bytes, rx_buf=buf_bytes,
                    offload=offload, packed=packed) as rings:
        guest = Guest(rings, mss)
        if argv[4:5] != ["noarp"]:  # the ring case's back-end discards everything, ARP included
            guest.net.resolve_gateway()
            guest.net.announce()
        else:
            guest.net.gateway_mac = b"\xff" * 6

        def call(op: str, arguments: dict[str, Any]) -> dict[str, Any]:
            try:
                reply = getattr(guest, f"op_{op}")(**arguments)
            except (TimeoutError, RuntimeError) as exc:
                reply = {"error": str(exc)}
            reply["tx_kicks"] = rings.tx.kicks  # error replies carry it too
            return reply

        serve_json_lines(call)
    return 0


def _repeated_digest(block: bytes, length: int) -> str:
    digest = hashlib.sha256()
    whole, rest = divmod(length, len(block))
    for _ in range(whole):
        digest.update(block)
    digest.update(block[:rest])
    return digest.hexdigest()


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1:]))
