"""Several guests on one vhostnet (``--max-guests 2``), VM-less: the project's front-ends play
two QEMUs against a real ``python -m vhostnet`` process.

Each guest gets its own lease, ARP and frames between them are switched, each reaches the
host through its own NAT, a third front-end is refused, one guest going away leaves the
other's TCP connection alone, a guest back with its MAC gets its lease back, ``vhostnet ctl``
lists them, and a forward added at run time for guest 2 reaches guest 2 only.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from testkit.frontend import Frontend
from tests.e2e.hostservers import free_port
from tests.support.daemon import VhostnetProcess, run_cli
from tests.support.frames import BROADCAST, GATEWAY_IP, eth, ipv4, udp
from tests.support.hostio import port_is_free
from tests.support.migration import check, load_over_pipe, save_over_pipe
from vhostnet.migration.state import decode_state
from vhostnet.stack.config import ip4, ip4_str
from vhostnet.wire.tcp import ACK, PSH, SYN, TcpSegment

MAC1 = bytes.fromhex("525400000101")
MAC2 = bytes.fromhex("525400000202")
MAC3 = bytes.fromhex("525400000303")
FIRST, SECOND = ip4("10.0.2.15"), ip4("10.0.2.16")
ZERO_IP = bytes(4)


@pytest.fixture
def vhostnet(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VhostnetProcess]:
    process = VhostnetProcess(tmp_path, "--max-guests", "2", *getattr(request, "param", ()))
    try:
        yield process
    finally:
        alive = process.process.poll() is None
        code = process.stop()
        assert alive, f"vhostnet died during the test:\n{process.log_path.read_text()}"
        assert code == 0, process.log_path.read_text()


class StreamLink:
    """QEMU's ``-netdev stream`` on the same socket: frames after their 4-byte length."""

    def __init__(self, socket_path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(socket_path)
        self.buffer = b""

    def send_frame(self, frame: bytes) -> None:
        self.sock.sendall(len(frame).to_bytes(4, "big") + frame)

    def receive_frames(self, timeout: float = 1.0) -> list[bytes]:
        self.sock.settimeout(timeout)
        try:
            self.buffer += self.sock.recv(1 << 20)
        except TimeoutError:
            pass
        frames = []
        while len(self.buffer) >= 4 and len(self.buffer) >= 4 + (
                length := int.from_bytes(self.buffer[:4], "big")):
            frames.append(self.buffer[4:4 + length])
            self.buffer = self.buffer[4 + length:]
        return frames

    def close(self) -> None:
        self.sock.close()


class Guest:
    """A front-end with a MAC: sends frames, keeps what it receives, picks frames out."""

    def __init__(self, socket_path: str, mac: bytes, stream: bool = False) -> None:
        self.mac = mac
        self.frontend: Frontend | StreamLink
        if stream:
            self.frontend = StreamLink(socket_path)
        else:
            self.frontend = Frontend(socket_path)
            self.frontend.connect()
            self.frontend.start()
        self.received: list[bytes] = []
        self.ip: bytes | None = None

    def send(self, frame: bytes) -> None:
        self.frontend.send_frame(frame)

    def wait_for(self, wanted: Callable[[bytes], bool], what: str, timeout: float = 5.0) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            for index, frame in enumerate(self.received):
                if wanted(frame):
                    return self.received.pop(index)
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.mac.hex(':')} never got {what}: {self.received}")
            self.received += self.frontend.receive_frames(timeout=0.2)

    def drain(self, seconds: float = 0.3) -> list[bytes]:
        self.received += self.frontend.receive_frames(timeout=seconds)
        frames, self.received = self.received, []
        return frames

    def dhcp(self) -> bytes:
        """DISCOVER from our MAC: the offered address."""
        bootp = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, int.from_bytes(self.mac[2:],
                            "big"), 0, 0x8000, ZERO_IP, ZERO_IP, ZERO_IP, ZERO_IP,
                            self.mac + bytes(10), b"", b"")
        bootp += b"\x63\x82\x53\x63" + bytes((53, 1, 1)) + b"\xff"
        self.send(eth(BROADCAST, self.mac, 0x0800,
                      ipv4(ZERO_IP, b"\xff" * 4, 17, udp(ZERO_IP, 68, b"\xff" * 4, 67, bootp))))
        offer = self.wait_for(lambda f: is_udp(f, sport=67) and f[14 + 20 + 8 + 28:][:6]
                              == self.mac, "a DHCP offer")
        self.ip = offer[14 + 20 + 8 + 16:][:4]
        return self.ip

    def udp_to(self, dst_mac: bytes, dst_ip: bytes, sport: int, dport: int,
               payload: bytes) -> bytes:
        frame = eth(dst_mac, self.mac, 0x0800,
                    ipv4(self.ip, dst_ip, 17, udp(self.ip, sport, dst_ip, dport, payload)))
        self.send(frame)
        return frame

    def tcp_to(self, dst_ip: bytes, sport: int, dport: int, seq: int, ack: int, flags: int,
               payload: bytes = b"", gateway: bytes = b"") -> None:
        segment = TcpSegment(sport, dport, seq, ack, flags, 65535, payload,
                             1460 if flags & SYN else None, None).emit(self.ip, dst_ip)
        self.send(eth(gateway, self.mac, 0x0800, ipv4(self.ip, dst_ip, 6, segment)))

    def close(self) -> None:
        self.frontend.close()


def is_udp(frame: bytes, *, sport: int | None = None, dport: int | None = None) -> bool:
    if frame[12:14] != b"\x08\x00" or frame[23] != 17:
        return False
    source, destination = struct.unpack_from("!HH", frame, 34)
    return (sport is None or source == sport) and (dport is None or destination == dport)


def is_arp(frame: bytes, op: int, target_ip: bytes) -> bool:
    return (frame[12:14] == b"\x08\x06" and frame[20:22] == op.to_bytes(2, "big")
            and frame[38:42] == target_ip)


def arp(mac: bytes, op: int, sender_ip: bytes, target_mac: bytes, target_ip: bytes,
        dst: bytes) -> bytes:
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, mac, sender_ip, target_mac,
                       target_ip)
    return eth(dst, mac, 0x0806, body)


def tcp_of(frame: bytes) -> TcpSegment | None:
    if frame[12:14] != b"\x08\x00" or frame[23] != 6:
        return None
    return TcpSegment.parse(frame[34:])


def gateway_mac_of(guest: Guest) -> bytes:
    guest.send(arp(guest.mac, 1, guest.ip, bytes(6), GATEWAY_IP, BROADCAST))
    reply = guest.wait_for(lambda f: is_arp(f, 2, guest.ip) and f[28:32] == GATEWAY_IP,
                           "the gateway's ARP reply")
    return reply[22:28]


class EchoServer:
    """A host TCP server echoing what it gets, upper-cased."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # vhostnet resets it when the test ends
            while data := conn.recv(4096):
                conn.sendall(data.upper())

    def close(self) -> None:
        self.sock.close()


class GuestTcp:
    """One guest TCP connection to the host through the guest's router, driven by hand."""

    def __init__(self, guest: Guest, gateway: bytes, port: int, sport: int) -> None:
        self.guest, self.gateway, self.port, self.sport = guest, gateway, port, sport
        self.seq = 1000
        guest.tcp_to(GATEWAY_IP, sport, port, self.seq, 0, SYN, gateway=gateway)
        synack = self.segment(lambda s: bool(s.flags & SYN), "a SYN-ACK")
        self.seq += 1
        self.ack = synack.seq + 1
        guest.tcp_to(GATEWAY_IP, sport, port, self.seq, self.ack, ACK, gateway=gateway)

    def segment(self, wanted: Callable[[TcpSegment], bool], what: str) -> TcpSegment:
        frame = self.guest.wait_for(
            lambda f: (s := tcp_of(f)) is not None and s.dst_port == self.sport and wanted(s),
            what)
        segment = tcp_of(frame)
        assert segment is not None
        assert frame[30:34] == self.guest.ip  # to this guest's own address: its own NAT
        return segment

    def exchange(self, data: bytes) -> bytes:
        self.guest.tcp_to(GATEWAY_IP, self.sport, self.port, self.seq, self.ack, ACK | PSH,
                          data, gateway=self.gateway)
        self.seq += len(data)
        answer = self.segment(lambda s: len(s.payload) > 0, "echoed data")
        self.ack = answer.seq + len(answer.payload)
        self.guest.tcp_to(GATEWAY_IP, self.sport, self.port, self.seq, self.ack, ACK,
                          gateway=self.gateway)
        return bytes(answer.payload)


def test_two_guests_share_a_switch_each_with_its_own_router(vhostnet: VhostnetProcess) -> None:
    one = Guest(vhostnet.socket_path, MAC1)
    two = Guest(vhostnet.socket_path, MAC2)
    echo = EchoServer()
    try:
        # Different leases, the first -a address first.
        assert one.dhcp() == FIRST
        assert two.dhcp() == SECOND
        one.drain()
        two.drain()

        # ARP between them is switched: the broadcast request reaches guest 2, its unicast
        # answer reaches guest 1 only.
        request = arp(MAC1, 1, FIRST, bytes(6), SECOND, BROADCAST)
        one.send(request)
        assert two.wait_for(lambda f: f == request, "guest 1's ARP request") == request
        answer = arp(MAC2, 2, SECOND, MAC1, FIRST, MAC1)
        two.send(answer)
        assert one.wait_for(lambda f: f == answer, "guest 2's ARP answer") == answer
        assert answer not in two.drain()

        # A frame from guest 1 to guest 2's MAC arrives intact in guest 2's ring.
        payload = bytes(range(256)) * 4
        sent = one.udp_to(MAC2, SECOND, 4000, 5000, payload)
        assert two.wait_for(lambda f: is_udp(f, dport=5000), "guest 1's datagram") == sent
        assert not [f for f in one.drain() if is_udp(f, dport=5000)]

        # Each reaches a host TCP server through its own NAT (frames to its own address).
        gateway1, gateway2 = gateway_mac_of(one), gateway_mac_of(two)
        first_tcp = GuestTcp(one, gateway1, echo.port, 40001)
        second_tcp = GuestTcp(two, gateway2, echo.port, 40002)
        assert first_tcp.exchange(b"one") == b"ONE"
        assert second_tcp.exchange(b"two") == b"TWO"
        # And a host UDP server, each from its own address, each answer to its sender only.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
            server.bind(("127.0.0.1", 0))
            server.settimeout(5)
            udp_port = server.getsockname()[1]
            for guest, gateway in ((one, gateway1), (two, gateway2)):
                guest.udp_to(gateway, GATEWAY_IP, 6000, udp_port, b"from " + guest.ip)
                data, peer = server.recvfrom(100)
                assert data == b"from " + guest.ip
                server.sendto(b"back to " + guest.ip, peer)
                answer = guest.wait_for(lambda f: is_udp(f, dport=6000), "the UDP answer")
                assert answer[30:34] == guest.ip and answer[42:] == b"back to " + guest.ip

        # A third front-end is refused, with a log line, counted.
        third = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        third.settimeout(5)
        third.connect(vhostnet.socket_path)
        try:
            assert third.recv(64) == b""
        except ConnectionResetError:
            pass
        third.close()
        assert "all 2 guest ports are in use" in vhostnet.log_path.read_text()
        stats = vhostnet.stats()
        assert stats["server.refused_full"] == 1
        assert stats["guest1.device.tx.frames"] > 0 and stats["guest2.device.tx.frames"] > 0
        assert "guest2.vq0.at.used_idx" in stats or any(k.startswith("guest2.vq0.at.")
                                                        for k in stats)

        # Guest 1 goes away: guest 2's connection carries on.
        one.close()
        time.sleep(0.3)
        assert second_tcp.exchange(b"still here") == b"STILL HERE"

        # Guest 1 back with its MAC (a QEMU restart): the same lease.
        one = Guest(vhostnet.socket_path, MAC1)
        assert one.dhcp() == FIRST

        # vhostnet ctl lists both guests and the pool.
        table = run_cli("ctl", vhostnet.control_path, "guests")
        assert table.returncode == 0, table.stderr
        for text in (MAC1.hex(":"), MAC2.hex(":"), "10.0.2.15", "10.0.2.16"):
            assert text in table.stdout
        listed = json.loads(run_cli("ctl", "--json", vhostnet.control_path, "guests").stdout)
        by_ip = {g["ipv4"]: g for g in listed["guests"]}
        assert by_ip["10.0.2.16"]["mac"] == MAC2.hex(":") and by_ip["10.0.2.16"]["connected"]
        assert by_ip["10.0.2.16"]["tcp_flows"] == 1
        leases = json.loads(run_cli("ctl", "--json", vhostnet.control_path, "leases").stdout)
        assert {(lease["mac"], lease["ipv4"]) for lease in leases["leases"]} == {
            (MAC1.hex(":"), "10.0.2.15"), (MAC2.hex(":"), "10.0.2.16")}
    finally:
        echo.close()
        one.close()
        two.close()


def test_a_run_time_forward_names_its_guest(vhostnet: VhostnetProcess) -> None:
    one = Guest(vhostnet.socket_path, MAC1)
    two = Guest(vhostnet.socket_path, MAC2)
    try:
        one.dhcp()
        two.dhcp()
        port = free_port()
        added = run_cli("ctl", vhostnet.control_path, "add", "tcp", f"{port}:10.0.2.16/8080")
        assert added.returncode == 0, added.stderr
        assert "10.0.2.16" in run_cli("ctl", vhostnet.control_path, "list").stdout
        # Naming no guest's address: one sentence, nothing changed.
        refused = run_cli("ctl", vhostnet.control_path, "add", "tcp", f"{port + 1}:10.0.2.99/80")
        assert refused.returncode == 1 and "no guest has address 10.0.2.99" in refused.stderr
        one.drain()
        two.drain()
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            syn_frame = two.wait_for(lambda f: (s := tcp_of(f)) is not None
                                     and s.dst_port == 8080 and bool(s.flags & SYN),
                                     "the forwarded SYN")
            assert syn_frame[30:34] == SECOND and syn_frame[:6] == MAC2
            assert not [f for f in one.drain() if (s := tcp_of(f)) and s.dst_port == 8080]
        finally:
            client.close()
        removed = run_cli("ctl", vhostnet.control_path, "remove", "tcp", f"{port}")
        assert removed.returncode == 0, removed.stderr
        assert port_is_free(port)
        assert ip4_str(SECOND) not in run_cli("ctl", vhostnet.control_path, "list").stdout
    finally:
        one.close()
        two.close()


FORWARDED = free_port()


@pytest.mark.parametrize("vhostnet", [("-t", f"{FORWARDED}:10.0.2.16/8080")], indirect=True)
def test_a_command_line_forward_to_another_guest_address(vhostnet: VhostnetProcess) -> None:
    one = Guest(vhostnet.socket_path, MAC1)
    two = Guest(vhostnet.socket_path, MAC3)
    try:
        one.dhcp()
        assert two.dhcp() == SECOND  # the second lease: the Network the forward went to
        with socket.create_connection(("127.0.0.1", FORWARDED), timeout=5):
            syn_frame = two.wait_for(lambda f: (s := tcp_of(f)) is not None
                                     and s.dst_port == 8080 and bool(s.flags & SYN),
                                     "the forwarded SYN")
            assert syn_frame[30:34] == SECOND and syn_frame[:6] == MAC3
    finally:
        one.close()
        two.close()


def test_a_migrated_guest_keeps_its_lease_and_flow(tmp_path: Path) -> None:
    """Guest 2 of a source moves to a destination where another guest already holds the
    first address: its state carries its lease, so it keeps 10.0.2.16 and its UDP flow."""
    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()
    source = VhostnetProcess(tmp_path / "src", "--max-guests", "2")
    destination = VhostnetProcess(tmp_path / "dst", "--max-guests", "2")
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", 0))
    listener.settimeout(5)
    udp_port = listener.getsockname()[1]
    guests: list[Guest] = []
    try:
        guests += [Guest(source.socket_path, MAC1), Guest(source.socket_path, MAC2)]
        one, two = guests
        one.dhcp()
        assert two.dhcp() == SECOND
        gateway = gateway_mac_of(two)
        two.udp_to(gateway, GATEWAY_IP, 7000, udp_port, b"before")
        assert listener.recv(100) == b"before"
        two.frontend.stop()
        blob = save_over_pipe(two.frontend)
        assert check(two.frontend) == 0
        assert decode_state(blob)["lease"]["ipv4"] == SECOND.hex()

        guests.append(Guest(destination.socket_path, MAC3))
        assert guests[-1].dhcp() == FIRST  # the destination's first address is taken
        arrived = Frontend(destination.socket_path)
        try:
            arrived.connect()
            assert load_over_pipe(arrived, blob) == 0
            arrived.start()
            moved = destination.stats()
            assert moved["udp.flows"] == 1
            listed = json.loads(run_cli("ctl", "--json", destination.control_path,
                                        "guests").stdout)
            assert {(g["mac"], g["ipv4"]) for g in listed["guests"] if g["connected"]} == {
                (MAC3.hex(":"), "10.0.2.15"), (MAC2.hex(":"), "10.0.2.16")}
            frame = eth(gateway, MAC2, 0x0800,
                        ipv4(SECOND, GATEWAY_IP, 17, udp(SECOND, 7000, GATEWAY_IP, udp_port,
                                                         b"after")))
            arrived.send_frame(frame)
            assert listener.recv(100) == b"after"
        finally:
            arrived.close()
    finally:
        listener.close()
        for guest in guests:
            guest.close()
        for process in (source, destination):
            alive = process.process.poll() is None
            process.stop()
            assert alive, process.log_path.read_text()


def test_a_stream_front_end_joins_the_switch(vhostnet: VhostnetProcess) -> None:
    """QEMU's -netdev stream beside a vhost-user guest: its own lease, frames both ways."""
    ring = Guest(vhostnet.socket_path, MAC1)
    stream = Guest(vhostnet.socket_path, MAC3, stream=True)
    try:
        assert ring.dhcp() == FIRST
        assert stream.dhcp() == SECOND
        to_stream = ring.udp_to(MAC3, SECOND, 4000, 5000, b"ring to stream" * 50)
        assert stream.wait_for(lambda f: is_udp(f, dport=5000), "the ring's frame") == to_stream
        to_ring = stream.udp_to(MAC1, FIRST, 5000, 4000, b"stream to ring")
        assert ring.wait_for(lambda f: is_udp(f, dport=4000), "the stream's frame") == to_ring
        stats = vhostnet.stats()
        assert stats["guest2.stream.rx.frames"] >= 2  # the offer and the ring's frame
        assert stats["switch.forwarded"] >= 2
    finally:
        ring.close()
        stream.close()


def test_a_forward_to_an_address_outside_the_subnet_is_one_sentence(tmp_path: Path) -> None:
    result = run_cli("-f", "--socket", str(tmp_path / "vn.sock"), "--max-guests", "2",
                     "-t", "8080:192.168.9.9/80")
    assert result.returncode == 2
    assert result.stderr == ("vhostnet: forwards go to 192.168.9.9, which is neither the first "
                             "guest's address nor an IPv4 address of the guest subnet\n")
