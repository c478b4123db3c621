"""Hostile guest frames against a real vhostnet process: each is dropped and counted,
and a TCP connection through vhostnet to a host echo server carries on around them.

The guest is ``Frontend`` (QEMU plus a virtio driver in Python); the TCP
endpoint on the guest side is scripted below. Only loopback is used.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from testkit.frontend import DRIVER_FEATURES, Frontend
from tests.support.daemon import VhostnetProcess, gateway_mac
from tests.support.frames import GATEWAY_IP, GUEST_IP, GUEST_MAC, checksum, eth, ipv4, udp
from vhostnet.vhost_user.protocol import VirtioFeature

GUEST_PORT = 40123
WAIT = 5.0  # seconds for any single expected answer

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10


def tcp(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int,
        payload: bytes = b"", *, options: bytes = b"", data_offset: int | None = None,
        corrupt: bool = False) -> bytes:
    words = data_offset if data_offset is not None else (20 + len(options)) // 4
    header = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, words << 4, flags, 65535, 0, 0)
    segment = header + options + payload
    pseudo = src + dst + struct.pack("!BBH", 0, 6, len(segment))
    value = checksum(pseudo + segment) ^ (0x1111 if corrupt else 0)
    return segment[:16] + struct.pack("!H", value) + segment[18:]


class EchoServer:
    """Echoes every byte on 127.0.0.1, one thread per connection, bounded by timeouts."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        conn.settimeout(30)
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.listener.close()


class ScriptedTcp:
    """The guest side of one TCP connection to the gateway, driven step by step."""

    def __init__(self, frontend: Frontend, mac: bytes, port: int) -> None:
        self.frontend, self.mac, self.port = frontend, mac, port
        self.seq = 1000
        self.ack = 0
        self.received = bytearray()
        self.peer_fin = False

    def _send(self, flags: int, payload: bytes = b"", options: bytes = b"") -> None:
        segment = tcp(GUEST_IP, GATEWAY_IP, GUEST_PORT, self.port, self.seq, self.ack, flags,
                      payload, options=options)
        self.frontend.send_frame(eth(self.mac, GUEST_MAC, 0x0800,
                                     ipv4(GUEST_IP, GATEWAY_IP, 6, segment)))

    def _segments(self, until: Callable[[], bool]) -> None:
        deadline = time.monotonic() + WAIT
        while not until() and time.monotonic() < deadline:
            for frame in self.frontend.receive_frames(timeout=0.2):
                if frame[12:14] != b"\x08\x00" or frame[23] != 6:
                    continue
                header_len = (frame[14] & 0x0F) * 4
                total = struct.unpack("!H", frame[16:18])[0]
                segment = frame[14 + header_len : 14 + total]
                sport, dport, seq, _ack, offset, flags = struct.unpack("!HHIIBB", segment[:14])
                if (sport, dport) != (self.port, GUEST_PORT):
                    continue
                payload = segment[(offset >> 4) * 4 :]
                if flags & SYN:
                    self.ack = seq + 1
                elif seq == self.ack:
                    self.received += payload
                    self.ack += len(payload)
                    if flags & FIN:
                        self.ack += 1
                        self.peer_fin = True
                if payload or flags & (SYN | FIN):
                    self._send(ACK)

    def connect(self) -> None:
        self._send(SYN, options=struct.pack("!BBH", 2, 4, 1460))
        self.seq += 1
        self._segments(lambda: self.ack != 0)
        assert self.ack != 0, "no SYN-ACK from vhostnet"

    def exchange(self, data: bytes) -> bytes:
        start = len(self.received)
        self._send(ACK | PSH, data)
        self.seq += len(data)
        self._segments(lambda: len(self.received) >= start + len(data))
        return bytes(self.received[start:])

    def close(self) -> None:
        self._send(FIN | ACK)
        self.seq += 1
        self._segments(lambda: self.peer_fin)
        assert self.peer_fin, "no FIN from vhostnet after the echo server closed"


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[VhostnetProcess, Frontend, bytes, EchoServer]]:
    process = VhostnetProcess(tmp_path)
    echo = EchoServer()
    try:
        # TX offloads negotiated, so that lying offload headers reach vhostnet's checks.
        features = DRIVER_FEATURES | VirtioFeature.NET_F_CSUM | VirtioFeature.NET_F_HOST_TSO4
        with Frontend(process.socket_path, features=features) as frontend:
            frontend.connect()
            frontend.start()
            yield process, frontend, gateway_mac(frontend), echo
    finally:
        echo.close()
        alive = process.process.poll() is None
        code = process.stop()
        assert alive, f"vhostnet died:\n{process.log_path.read_text()}"
        assert code == 0, process.log_path.read_text()


def _guest_ipv4(mac: bytes, proto: int, payload: bytes, dst: bytes = GATEWAY_IP, **kwargs) -> bytes:
    return eth(mac, GUEST_MAC, 0x0800, ipv4(GUEST_IP, dst, proto, payload, **kwargs))


def _dhcp(options: bytes) -> bytes:
    fixed = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, 0x1234, 0, 0x8000, bytes(4),
                        bytes(4), bytes(4), bytes(4), GUEST_MAC + bytes(10), bytes(64), bytes(128))
    return fixed + b"\x63\x82\x53\x63" + options


def _udp_to(mac: bytes, dst: bytes, sport: int, dport: int, payload: bytes,
            src: bytes = GUEST_IP) -> bytes:
    return eth(mac, GUEST_MAC, 0x0800, ipv4(src, dst, 17, udp(src, sport, dst, dport, payload)))


def hostile_frames(mac: bytes, echo_port: int) -> list[tuple[str, str, bytes]]:
    """(what, counter that must grow, frame)."""
    good_udp = udp(GUEST_IP, 5000, GATEWAY_IP, 9, b"hello")
    bad_udp_checksum = good_udp[:6] + struct.pack("!H", struct.unpack("!H", good_udp[6:8])[0] ^ 1)
    bad_udp_checksum += good_udp[8:]
    long_udp = good_udp[:4] + struct.pack("!H", 200) + good_udp[6:]
    syn = struct.pack("!BBH", 2, 4, 1460)
    broadcast = b"\xff" * 6
    return [
        ("truncated Ethernet header", "vq1.tx_frame_too_short", mac + GUEST_MAC[:4]),
        ("truncated IPv4 header", "ipv4.drop.short", eth(mac, GUEST_MAC, 0x0800, bytes(12))),
        ("IPv4 total length past the frame", "ipv4.drop.bad_length",
         _guest_ipv4(mac, 17, good_udp, total_length=400)),
        ("IPv4 total length below the header", "ipv4.drop.bad_length",
         _guest_ipv4(mac, 17, good_udp, total_length=12)),
        ("IPv4 header length 4 words", "ipv4.drop.bad_ihl", _guest_ipv4(mac, 17, good_udp, ihl=4)),
        ("IPv4 header checksum", "ipv4.drop.bad_checksum",
         _guest_ipv4(mac, 17, good_udp, bad_checksum=True)),
        ("UDP checksum", "udp.drop.bad_checksum", _guest_ipv4(mac, 17, bad_udp_checksum)),
        ("UDP length past the packet", "udp.drop.bad_length", _guest_ipv4(mac, 17, long_udp)),
        ("UDP header truncated", "udp.drop.short", _guest_ipv4(mac, 17, good_udp[:5])),
        ("TCP checksum", "tcp.drop.bad_checksum",
         _guest_ipv4(mac, 6, tcp(GUEST_IP, GATEWAY_IP, 41000, echo_port, 1, 0, SYN,
                                 options=syn, corrupt=True))),
        ("TCP data offset past the segment", "tcp.drop.bad_data_offset",
         _guest_ipv4(mac, 6, tcp(GUEST_IP, GATEWAY_IP, 41001, echo_port, 1, 0, SYN,
                                 data_offset=15))),
        ("TCP SYN+FIN", "tcp.drop.flags_syn_fin",
         _guest_ipv4(mac, 6, tcp(GUEST_IP, GATEWAY_IP, 41002, echo_port, 1, 0, SYN | FIN))),
        ("TCP SYN+RST", "tcp.drop.flags_syn_rst",
         _guest_ipv4(mac, 6, tcp(GUEST_IP, GATEWAY_IP, 41003, echo_port, 1, 0, SYN | RST))),
        ("TCP without flags", "tcp.drop.flags_no_ack",
         _guest_ipv4(mac, 6, tcp(GUEST_IP, GATEWAY_IP, 41004, echo_port, 1, 0, 0, b"x"))),
        ("TCP bad option length", "tcp.drop.bad_options",
         _guest_ipv4(mac, 6, tcp(GUEST_IP, GATEWAY_IP, 41005, echo_port, 1, 0, SYN,
                                 options=b"\x02\x09\x05\xb4"))),
        ("DHCP option running past the end", "dhcp.drop.truncated_option",
         _udp_to(broadcast, broadcast[:4], 68, 67, _dhcp(b"\x35\x01\x01\x0c\x40abc"),
                 src=bytes(4))),
        ("DHCP option without length byte", "dhcp.drop.truncated_option",
         _udp_to(broadcast, broadcast[:4], 68, 67, _dhcp(b"\x35\x01\x01\x0c"), src=bytes(4))),
        ("DHCP message too short", "dhcp.drop.short",
         _udp_to(broadcast, broadcast[:4], 68, 67, b"\x01\x01\x06\x00" + bytes(20),
                 src=bytes(4))),
        ("oversized frame (beyond 64 KiB)", "vq1.tx_frame_too_long",
         _guest_ipv4(mac, 17, bytes(70000), total_length=65535)),
    ]


def vnet_header(flags: int, gso_type: int, gso_size: int, csum_start: int,
                csum_offset: int) -> bytes:
    return struct.pack("<BBHHHHH", flags, gso_type, 0, gso_size, csum_start, csum_offset, 0)


def hostile_headers(mac: bytes, echo_port: int) -> list[tuple[str, str, bytes, bytes]]:
    """(what, counter that must grow, virtio-net header, frame): offload fields that lie."""
    segment = tcp(GUEST_IP, GATEWAY_IP, 41100, echo_port, 1, 0, SYN)
    frame = _guest_ipv4(mac, 6, segment)
    needs_csum, tcpv4 = 1, 1
    return [
        ("checksum position past the frame", "vq1.tx_bad_csum_offset",
         vnet_header(needs_csum, 0, 0, 34, len(frame)), frame),
        ("checksum start inside the Ethernet header", "vq1.tx_bad_csum_offset",
         vnet_header(needs_csum, 0, 0, 2, 16), frame),
        ("TSO without a segment size", "vq1.tx_bad_gso", vnet_header(needs_csum, tcpv4, 0, 34, 16),
         frame),
        ("TSO without a partial checksum", "vq1.tx_bad_gso", vnet_header(0, tcpv4, 1448, 0, 0),
         frame),
        ("UDP fragmentation offload (never offered)", "vq1.tx_offload_not_negotiated",
         vnet_header(needs_csum, 3, 1448, 34, 6), frame),
        ("TSOv6 (not negotiated)", "vq1.tx_offload_not_negotiated",
         vnet_header(needs_csum, 4, 1448, 34, 16), frame),
        ("TSO header on a frame whose IPv4 length runs past it", "ipv4.drop.bad_length",
         vnet_header(needs_csum, tcpv4, 1448, 34, 16),
         _guest_ipv4(mac, 6, segment + bytes(3000), total_length=9000)),
        ("partial checksum on a segment whose data offset lies", "tcp.drop.bad_data_offset",
         vnet_header(needs_csum, 0, 0, 34, 16),
         _guest_ipv4(mac, 6, tcp(GUEST_IP, GATEWAY_IP, 41101, echo_port, 1, 0, SYN,
                                 data_offset=15))),
    ]


def stats_after_change(process: VhostnetProcess, name: str, before: int) -> int:
    """The counter ``name`` once it moved past ``before`` (bounded wait), else its value."""
    deadline = time.monotonic() + WAIT
    while True:
        value = process.stats().get(name, 0)
        if value > before or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


def test_hostile_frames_are_dropped_counted_and_traffic_carries_on(setup) -> None:
    process, frontend, mac, echo = setup
    connection = ScriptedTcp(frontend, mac, echo.port)
    connection.connect()
    assert connection.exchange(b"before the storm") == b"before the storm"

    missed = []
    for what, counter, frame in hostile_frames(mac, echo.port):
        before = process.stats().get(counter, 0)
        frontend.send_frame(frame)
        after = stats_after_change(process, counter, before)
        if after != before + 1:
            missed.append(f"{what}: {counter} went {before} -> {after}")
        # The connection still works between every two hostile frames.
        assert connection.exchange(what.encode()) == what.encode(), what
    for what, counter, header, frame in hostile_headers(mac, echo.port):
        before = process.stats().get(counter, 0)
        frontend.send_frame(frame, header)
        after = stats_after_change(process, counter, before)
        if after != before + 1:
            missed.append(f"{what}: {counter} went {before} -> {after}")
        assert connection.exchange(what.encode()) == what.encode(), what
    assert not missed, "\n".join(missed)

    stats = process.stats()
    assert stats["tcp.flows_open"] == 1, "a hostile frame must not open or close flows"
    connection.close()
    assert stats_after_change(process, "tcp.closed", 0) >= 1
    assert process.process.poll() is None
