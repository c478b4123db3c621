"""TCP glue with real sockets on 127.0.0.1: a scripted in-test guest talks to TcpEngine in segments.

No VM: ``GuestTcp`` is a tiny TCP endpoint (no loss to handle, but it does
retransmit after a stall so partial host writes are exercised). Every host
socket is on loopback; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import socket
import time
from collections import deque
from collections.abc import AsyncIterator

import pytest

from tests.support.tcp import GATEWAY6, GUEST_IP6, FakePacket, SegmentOutput
from vhostnet.stack.config import PortForward, StackConfig
from vhostnet.tcp import host_peek as hostio_tcp
from vhostnet.tcp.engine import TcpEngine
from vhostnet.tcp.host import TcpHost
from vhostnet.wire.checksum import PROTO_TCP
from vhostnet.wire.tcp import ACK, FIN, RST, SYN, TcpSegment

GUEST_IP = bytes([10, 0, 2, 15])
GATEWAY = bytes([10, 0, 2, 2])  # mapped to 127.0.0.1 by StackConfig.host_destination
GUEST_WINDOW = 1 << 20
GUEST_WSCALE = 7
MSS = 1460
STALL_RETRANSMIT = 0.2


class GuestTcp:
    """One guest-side TCP connection, driven by segments from the engine."""

    def __init__(self, net: GuestNet, local_port: int, remote_ip: bytes, remote_port: int,
                 local_ip: bytes | None = None) -> None:
        self.net = net
        # The guest's address of the remote's family.
        self.local_ip = local_ip or (GUEST_IP6 if len(remote_ip) == 16 else GUEST_IP)
        self.local_port = local_port
        self.remote_ip = remote_ip
        self.remote_port = remote_port
        self.iss = random.getrandbits(32)
        self.snd_una = self.snd_nxt = 0  # relative to iss; data starts at 1
        self.snd_max = 0  # the highest snd_nxt so far (``tick`` rewinds snd_nxt, not this)
        self.snd_wnd = 0
        self.peer_wscale = 0
        self.irs = 0
        self.rcv_nxt = 0
        self.outgoing = bytearray()  # all data we will send, index 0 = relative seq 1
        self.want_fin = False
        self.fin_sent = False
        self.received = bytearray()
        self.peer_fin = False
        self.reset = False
        self.established = False
        self.last_progress = time.monotonic()

    # -- guest actions
    def connect(self) -> None:
        self.snd_nxt = self.snd_max = 1
        self._emit(SYN, seq=0, ack=0, mss=MSS, wscale=GUEST_WSCALE)

    def accept(self, syn: TcpSegment) -> None:
        self.irs, self.rcv_nxt = syn.seq, 1
        self.peer_wscale = syn.wscale or 0
        self.snd_nxt = self.snd_max = 1
        self._emit(SYN | ACK, seq=0, mss=MSS, wscale=GUEST_WSCALE)

    def send(self, data: bytes, then_close: bool = False) -> None:
        self.outgoing += data
        self.want_fin = self.want_fin or then_close
        self.pump()

    @property
    def done(self) -> bool:
        return self.reset or (self.peer_fin and self.fin_sent and self.snd_una == self.snd_nxt)

    # -- segments from the engine
    def receive(self, seg: TcpSegment) -> None:
        if seg.flags & RST:
            self.reset = True
            return
        if seg.flags & SYN:
            self.irs, self.rcv_nxt = seg.seq, 1
            self.peer_wscale = seg.wscale or 0
            self.established = True
            self.snd_una = 1
            self.snd_wnd = seg.window
            self._ack()
            self.pump()
            return
        ack = (seg.ack - self.iss) % (1 << 32)
        assert ack <= self.snd_max, f"ACK {ack} of what the guest never sent ({self.snd_max})"
        if ack > self.snd_una:
            self.snd_una = ack
            self.last_progress = time.monotonic()
            self.established = True
            if ack > self.snd_nxt:
                # What was sent before a rewind (``tick``) arrived after all: go on from there.
                self.snd_nxt = ack
                self.fin_sent = ack == len(self.outgoing) + 2  # (only a sent FIN counts there)
        self.snd_wnd = seg.window << self.peer_wscale
        seq = (seg.seq - self.irs) % (1 << 32)
        if seg.payload or seg.flags & FIN:
            if seq == self.rcv_nxt:
                self.received += seg.payload
                self.rcv_nxt += len(seg.payload)
                if seg.flags & FIN:
                    self.peer_fin = True
                    self.rcv_nxt += 1
            self._ack()
        self.pump()

    def pump(self) -> None:
        if not self.established:
            return
        limit = self.snd_una + self.snd_wnd
        while self.snd_nxt - 1 < len(self.outgoing) and self.snd_nxt < limit:
            start = self.snd_nxt - 1
            chunk = bytes(self.outgoing[start : start + min(MSS, limit - self.snd_nxt)])
            self._emit(ACK, seq=self.snd_nxt, payload=chunk)
            self.snd_nxt += len(chunk)
        if self.want_fin and self.snd_nxt - 1 == len(self.outgoing) and not self.fin_sent:
            self._emit(ACK | FIN, seq=self.snd_nxt)
            self.snd_nxt += 1
            self.fin_sent = True
        self.snd_max = max(self.snd_max, self.snd_nxt)

    def tick(self, now: float) -> None:
        """Go back to snd_una after a stall: the host may have taken only part of a write.
        A FIN in flight is unacknowledged too: it goes again after the data. Not in the
        handshake: ``pump`` sends no SYN (and from snd_nxt 0 it would spin on empty chunks)."""
        if (self.established and self.snd_una < self.snd_nxt
                and now - self.last_progress > STALL_RETRANSMIT):
            self.last_progress = now
            self.snd_nxt = self.snd_una
            self.fin_sent = False
            self.pump()

    def _ack(self) -> None:
        self._emit(ACK, seq=self.snd_nxt)

    def _emit(
        self, flags: int, seq: int, ack: int | None = None, payload: bytes = b"", **opts
    ) -> None:
        if ack is None:
            ack = (self.irs + self.rcv_nxt) % (1 << 32)
        window = GUEST_WINDOW if flags & SYN else GUEST_WINDOW >> GUEST_WSCALE
        segment = TcpSegment(
            self.local_port,
            self.remote_port,
            (self.iss + seq) % (1 << 32),
            ack,
            flags,
            window,
            payload,
            opts.get("mss"),
            opts.get("wscale"),
        )
        self.net.to_engine.append((self.local_ip, self.remote_ip,
                                   segment.emit(self.local_ip, self.remote_ip)))


class GuestNet(SegmentOutput):
    """The guest's side of the wire: engine output lands here, guest segments queue for the engine."""

    def __init__(self) -> None:
        self.conns: dict[int, GuestTcp] = {}
        self.from_engine: deque[tuple[bytes, bytes, bytes]] = deque()
        self.to_engine: deque[tuple[bytes, bytes, bytes]] = deque()
        self.listening: dict[int, list[GuestTcp]] = {}

    def send_ipv4(self, src: bytes, dst: bytes, proto: int, payload: bytes, *,
                  offload: int = 0) -> None:
        assert proto == PROTO_TCP and dst == GUEST_IP and not offload
        self.from_engine.append((src, dst, payload))

    def send_ipv6(self, src: bytes, dst: bytes, next_header: int, payload: bytes) -> None:
        assert next_header == PROTO_TCP and dst == GUEST_IP6
        self.from_engine.append((src, dst, payload))

    def deliver(self, engine: TcpEngine, now: float) -> bool:
        worked = False
        for _ in range(100_000):
            if self.from_engine:
                src, dst, raw = self.from_engine.popleft()
                seg = TcpSegment.parse(raw)
                conn = self.conns.get(seg.dst_port)
                if conn is None and seg.flags == SYN and seg.dst_port in self.listening:
                    conn = GuestTcp(self, seg.dst_port, src, seg.src_port, dst)
                    self.conns[seg.dst_port] = conn
                    self.listening[seg.dst_port].append(conn)
                    conn.accept(seg)
                elif conn is not None:
                    conn.receive(seg)
            elif self.to_engine:
                src, dst, raw = self.to_engine.popleft()
                packet = FakePacket(src, dst, memoryview(raw))
                if len(src) == 16:
                    engine.handle_ipv6(packet, now)
                else:
                    engine.handle_ipv4(packet, now)
            else:
                break
            worked = True
        return worked


async def run_until(
    net: GuestNet, engine: TcpEngine, host: TcpHost, finished, timeout: float
) -> None:
    """Shuttle segments and flush commands until ``finished()`` or the deadline (then fail)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = time.monotonic()
        worked = net.deliver(engine, now)
        host.flush()
        engine.poll_timers(now)
        host.flush()
        for conn in list(net.conns.values()):
            conn.tick(now)
        if finished():
            return
        await asyncio.sleep(0 if worked or net.from_engine else 0.001)
    raise AssertionError("timed out")


@contextlib.asynccontextmanager
async def established_flow(net: GuestNet, engine: TcpEngine, loop: asyncio.AbstractEventLoop,
                           local_port: int, serve) -> AsyncIterator[tuple[TcpHost, GuestTcp]]:
    """A guest connection from ``local_port`` to a loopback server running ``serve``, through a
    ``TcpHost``, established: (host glue, guest end); the glue and server are closed after."""
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    host = TcpHost(engine, loop)
    try:
        guest = GuestTcp(net, local_port, GATEWAY, port)
        net.conns[local_port] = guest
        guest.connect()
        await run_until(net, engine, host, lambda: guest.established, timeout=10)
        yield host, guest
    finally:
        host.close()
        server.close()
        await server.wait_closed()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def serve_sink_and_source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """SINK: read to EOF, answer the sha256. SOURCE n: send n deterministic bytes, close."""
    try:
        command = (await reader.readline()).split()
        if command[0] == b"SINK":
            digest = hashlib.sha256()
            while chunk := await reader.read(65536):
                digest.update(chunk)
            writer.write(digest.hexdigest().encode())
        elif command[0] == b"SOURCE":
            writer.write(random.Random(int(command[2])).randbytes(int(command[1])))
        await writer.drain()
    finally:
        writer.close()


def new_setup(config: StackConfig) -> tuple[asyncio.AbstractEventLoop, GuestNet, TcpEngine]:
    loop = asyncio.new_event_loop()
    net = GuestNet()
    return loop, net, TcpEngine(config, net)


@pytest.mark.parametrize("peek_offset", ["kernel_peek_off", "prefix_fallback"])
def test_megabytes_each_way_through_a_real_host_server(peek_offset: str, monkeypatch) -> None:
    if peek_offset == "prefix_fallback":
        monkeypatch.setattr(hostio_tcp, "probe_peek_off", lambda sock: False)
    else:
        with socket.socket() as probe:
            if not hostio_tcp.probe_peek_off(probe):
                pytest.skip("this kernel has no SO_PEEK_OFF for TCP; the fallback case covers it")
    fds_before = open_fds()
    loop, net, engine = new_setup(StackConfig())

    async def scenario() -> None:
        server = await asyncio.start_server(serve_sink_and_source, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        host = TcpHost(engine, loop)
        try:
            upload = random.Random(1).randbytes(3 * 1024 * 1024 + 123)
            up = GuestTcp(net, 41000, GATEWAY, port)
            net.conns[41000] = up
            up.connect()
            up.send(b"SINK\n" + upload, then_close=True)
            size = 3 * 1024 * 1024 + 7
            down = GuestTcp(net, 41001, GATEWAY, port)
            net.conns[41001] = down
            down.connect()
            down.send(f"SOURCE {size} 99\n".encode(), then_close=True)
            await run_until(net, engine, host, lambda: up.done and down.done, timeout=120)
            assert not up.reset and not down.reset
            assert up.received.decode() == hashlib.sha256(upload).hexdigest()
            expected = random.Random(99).randbytes(size)
            assert hashlib.sha256(down.received).digest() == hashlib.sha256(expected).digest()
            await run_until(net, engine, host, lambda: not engine.flows, timeout=10)
            assert host.open_sockets == 0
            counters = engine.counters()
            assert counters["tcp.bytes_to_host"] >= len(upload)
            assert counters["tcp.bytes_to_guest"] >= size
        finally:
            host.close()
            server.close()
            await server.wait_closed()

    loop.run_until_complete(scenario())
    loop.close()
    assert open_fds() == fds_before


def test_guest_rewind_with_its_fin_in_flight_still_finishes() -> None:
    """The guest goes back to snd_una (``tick``, as after a stall under load) while its data
    and FIN are in flight; the engine got them all and acknowledges the FIN. The guest must
    send the FIN again and take that ACK (it once kept waiting for an ACK it had, forever)."""
    loop, net, engine = new_setup(StackConfig())

    async def scenario() -> None:
        async with established_flow(net, engine, loop, 41200, serve_sink_and_source) as (
            host, guest
        ):
            upload = random.Random(3).randbytes(5000)
            guest.send(b"SINK\n" + upload, then_close=True)
            assert guest.fin_sent and not net.from_engine  # all of it queued for the engine
            guest.tick(guest.last_progress + 2 * STALL_RETRANSMIT)
            assert guest.snd_nxt == guest.snd_max  # the data and the FIN again, no ACK yet
            await run_until(net, engine, host, lambda: guest.done, timeout=10)
            assert not guest.reset
            assert guest.received.decode() == hashlib.sha256(upload).hexdigest()
            await run_until(net, engine, host, lambda: not engine.flows, timeout=10)

    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()


def test_guest_stalled_in_its_handshake_keeps_its_syn() -> None:
    """A stall before the SYN-ACK rewinds nothing (``pump`` cannot send a SYN again; from
    snd_nxt 0 it would spin on empty chunks once established); the connection then works."""
    loop, net, engine = new_setup(StackConfig())

    async def scenario() -> None:
        server = await asyncio.start_server(serve_sink_and_source, "127.0.0.1", 0)
        host = TcpHost(engine, loop)
        try:
            guest = GuestTcp(net, 41300, GATEWAY, server.sockets[0].getsockname()[1])
            net.conns[41300] = guest
            guest.connect()
            guest.tick(guest.last_progress + 2 * STALL_RETRANSMIT)
            assert (guest.snd_una, guest.snd_nxt) == (0, 1)
            guest.send(b"SINK\nabc", then_close=True)
            await run_until(net, engine, host, lambda: guest.done, timeout=10)
            assert guest.received.decode() == hashlib.sha256(b"abc").hexdigest()
        finally:
            host.close()
            server.close()
            await server.wait_closed()

    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()


def test_two_hundred_concurrent_connections_leave_no_flows_or_fds() -> None:
    fds_before = open_fds()
    loop, net, engine = new_setup(StackConfig())

    async def scenario() -> None:
        server = await asyncio.start_server(serve_sink_and_source, "127.0.0.1", 0, backlog=256)
        port = server.sockets[0].getsockname()[1]
        host = TcpHost(engine, loop)
        try:
            payloads = {}
            for index in range(200):
                conn = GuestTcp(net, 42000 + index, GATEWAY, port)
                net.conns[conn.local_port] = conn
                payloads[conn.local_port] = random.Random(index).randbytes(1000 + index * 37)
                conn.connect()
                conn.send(b"SINK\n" + payloads[conn.local_port], then_close=True)
            conns = list(net.conns.values())
            await run_until(net, engine, host, lambda: all(c.done for c in conns), timeout=120)
            for conn in conns:
                assert not conn.reset
                assert (
                    conn.received.decode() == hashlib.sha256(payloads[conn.local_port]).hexdigest()
                )
            await run_until(net, engine, host, lambda: not engine.flows, timeout=10)
            assert host.open_sockets == 0 and engine.next_timer() is None
        finally:
            host.close()
            server.close()
            await server.wait_closed()

    loop.run_until_complete(scenario())
    loop.close()
    assert open_fds() == fds_before


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_connection_refused_on_loopback_resets_the_guest() -> None:
    loop, net, engine = new_setup(StackConfig())
    host = TcpHost(engine, loop)

    async def scenario() -> None:
        conn = GuestTcp(net, 43000, GATEWAY, free_loopback_port())
        net.conns[43000] = conn
        conn.connect()
        await run_until(net, engine, host, lambda: conn.reset, timeout=10)
        assert not conn.established and engine.flows == {} and host.open_sockets == 0
        assert engine.counters()["tcp.connect_failed"] == 1

    try:
        loop.run_until_complete(scenario())
    finally:
        host.close()
        loop.close()


def test_inbound_forward_reaches_guest_echo_service() -> None:
    port = free_loopback_port()
    config = StackConfig(tcp_forwards=[PortForward("127.0.0.1", port, 7)])
    loop, net, engine = new_setup(config)
    net.listening[7] = []
    host = TcpHost(engine, loop)
    assert host.listening_addresses() == [("127.0.0.1", port)]

    async def scenario() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        message = random.Random(5).randbytes(200_000)

        async def echo_in_guest() -> None:
            def echoed() -> bool:
                for conn in net.listening[7]:
                    if conn.received and len(conn.outgoing) < len(conn.received):
                        conn.send(bytes(conn.received[len(conn.outgoing) :]))
                    if conn.peer_fin and not conn.want_fin:
                        conn.send(b"", then_close=True)
                return bool(net.listening[7]) and all(c.done for c in net.listening[7])

            await run_until(net, engine, host, echoed, timeout=60)

        guest = asyncio.ensure_future(echo_in_guest())
        writer.write(message)
        await writer.drain()
        writer.write_eof()
        answer = await asyncio.wait_for(reader.read(-1), 60)
        writer.close()
        await guest
        (conn,) = net.listening[7]
        assert conn.remote_ip == GATEWAY  # a loopback peer shows up as the gateway
        return answer if answer == message else b"mismatch"

    try:
        assert loop.run_until_complete(scenario()) != b"mismatch"
        loop.run_until_complete(run_until(net, engine, host, lambda: not engine.flows, timeout=10))
    finally:
        host.close()
        loop.close()


@pytest.mark.parametrize("abort_by", ["guest", "host"])
def test_resets_cross_in_both_directions(abort_by: str) -> None:
    loop, net, engine = new_setup(StackConfig())

    async def scenario() -> None:
        accepted: asyncio.Queue = asyncio.Queue()

        async def keep(reader, writer) -> None:
            await accepted.put((reader, writer))

        async with established_flow(net, engine, loop, 44000, keep) as (host, conn):
            reader, writer = await asyncio.wait_for(accepted.get(), 10)
            if abort_by == "guest":
                conn._emit(RST, seq=conn.snd_nxt, ack=0)
                await run_until(net, engine, host, lambda: not engine.flows, timeout=10)
                with pytest.raises(ConnectionResetError):
                    await asyncio.wait_for(reader.read(10), 10)
            else:
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                writer.transport.abort()
                await run_until(net, engine, host, lambda: conn.reset, timeout=10)
                assert engine.flows == {}
            writer.close()

    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()


def test_ipv6_upload_and_download_through_a_server_on_ipv6_loopback() -> None:
    """The guest reaches fec0::2 (mapped to ::1) over IPv6: data both ways, sha256 equal."""
    fds_before = open_fds()
    loop, net, engine = new_setup(StackConfig())

    async def scenario() -> None:
        server = await asyncio.start_server(serve_sink_and_source, "::1", 0)
        port = server.sockets[0].getsockname()[1]
        host = TcpHost(engine, loop)
        try:
            upload = random.Random(2).randbytes(1024 * 1024 + 11)
            up = GuestTcp(net, 41100, GATEWAY6, port)
            down = GuestTcp(net, 41101, GATEWAY6, port)
            net.conns.update({41100: up, 41101: down})
            up.connect()
            up.send(b"SINK\n" + upload, then_close=True)
            down.connect()
            down.send(b"SOURCE 1000003 98\n", then_close=True)
            await run_until(net, engine, host, lambda: up.done and down.done, timeout=120)
            assert not up.reset and not down.reset
            assert up.received.decode() == hashlib.sha256(upload).hexdigest()
            assert down.received == random.Random(98).randbytes(1000003)
            await run_until(net, engine, host, lambda: not engine.flows, timeout=10)
            assert host.open_sockets == 0
        finally:
            host.close()
            server.close()
            await server.wait_closed()

    loop.run_until_complete(scenario())
    loop.close()
    assert open_fds() == fds_before


def test_forward_without_address_takes_dual_stack() -> None:
    """``-t PORT``: one listener on [::] (IPv6 and v4-mapped IPv4 peers), each peer reaching
    the guest's address of its own family, seen as the mapped gateway of that family."""
    port = free_loopback_port()
    config = StackConfig(tcp_forwards=[PortForward("0.0.0.0", port, 7, dual_stack=True)],
                         guest_ipv6=GUEST_IP6)
    loop, net, engine = new_setup(config)
    net.listening[7] = []
    host = TcpHost(engine, loop)
    assert host.listening_addresses() == [("::", port)]

    async def talk(address: str, message: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(address, port)
        writer.write(message)
        await writer.drain()
        writer.write_eof()
        answer = await asyncio.wait_for(reader.read(-1), 60)
        writer.close()
        return answer

    async def scenario() -> None:
        def echoed() -> bool:
            for conn in net.listening[7]:
                if conn.received and len(conn.outgoing) < len(conn.received):
                    conn.send(bytes(conn.received[len(conn.outgoing):]))
                if conn.peer_fin and not conn.want_fin:
                    conn.send(b"", then_close=True)
            return len(net.listening[7]) == 2 and all(c.done for c in net.listening[7])

        guest = asyncio.ensure_future(run_until(net, engine, host, echoed, timeout=60))
        # One after the other: GuestNet tells connections apart by the guest's port alone.
        four = await talk("127.0.0.1", b"four" * 5000)
        for _ in range(10_000):
            if net.listening[7][0].done:
                break
            await asyncio.sleep(0.001)
        net.conns.clear()
        six = await talk("::1", b"six" * 7000)
        await guest
        assert four == b"four" * 5000 and six == b"six" * 7000
        seen = {(conn.local_ip, conn.remote_ip) for conn in net.listening[7]}
        assert seen == {(GUEST_IP, GATEWAY), (GUEST_IP6, GATEWAY6)}

    try:
        loop.run_until_complete(scenario())
        loop.run_until_complete(run_until(net, engine, host, lambda: not engine.flows, timeout=10))
    finally:
        host.close()
        loop.close()


@pytest.mark.parametrize("spec_address, peer, refused", [("::1", "::1", "127.0.0.1"),
                                                          ("127.0.0.1", "127.0.0.1", "::1")])
def test_forward_bound_to_one_family_takes_only_that_one(spec_address: str, peer: str,
                                                          refused: str) -> None:
    port = free_loopback_port()
    config = StackConfig(tcp_forwards=[PortForward(spec_address, port, 7)], guest_ipv6=GUEST_IP6)
    loop, net, engine = new_setup(config)
    host = TcpHost(engine, loop)
    try:
        with socket.create_connection((peer, port), timeout=5):
            pass
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((refused, port), timeout=5).close()
    finally:
        host.close()
        loop.close()
