"""Connection setup and teardown with real sockets: what a short connection costs and leaves.

Many connect/request/response/close cycles through ``TcpEngine`` + ``TcpHost`` against a
real echo server on 127.0.0.1 must leave no flow, socket, epoll registration, timer or fd
behind, and set only the socket options a new connection needs. ``Readiness`` (the flow
sockets' own epoll set) is tested with real socket pairs on a real event loop.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import random
import select
import socket
import time

import pytest
from vhostnet.tcp._frames import control_frame

from tests.support.hostio import tcp_echo_until_eof
from tests.tcp.test_hostio_tcp import (
    GATEWAY,
    GUEST_IP,
    GuestTcp,
    new_setup,
    open_fds,
    run_until,
)
from vhostnet.network import build_stack
from vhostnet.stack.config import StackConfig
from vhostnet.tcp import host as tcp_host
from vhostnet.tcp.engine import TcpEngine
from vhostnet.tcp.flow import Phase
from vhostnet.tcp.readiness import Readiness
from vhostnet.wire.checksum import internet_checksum
from vhostnet.wire.tcp import ACK, FIN, PSH, RST, SYN, build_options, emit_segment

CONNECTIONS = 200


class CountingSocket(socket.socket):
    """A socket that records the options set on it (the glue's outbound sockets)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.options: list[tuple[int, int, object]] = []

    def setsockopt(self, level, option, value, *rest):  # type: ignore[override]
        self.options.append((level, option, value))
        return super().setsockopt(level, option, value, *rest)


def counting_outbound(opened: list[CountingSocket]):
    real = tcp_host.open_outbound

    def open_counted(*args, **kwargs) -> CountingSocket:
        sock = real(*args, **kwargs)
        counted = CountingSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
        counted.setblocking(False)
        opened.append(counted)
        return counted

    return open_counted


def test_many_short_connections_leave_nothing_behind_and_set_few_options(monkeypatch) -> None:
    opened: list[CountingSocket] = []
    monkeypatch.setattr(tcp_host, "open_outbound", counting_outbound(opened))
    gc.collect()  # sockets earlier tests left to the collector close now, not during the count
    fds_before = open_fds()
    loop, net, engine = new_setup(StackConfig())

    async def scenario() -> None:
        server = await asyncio.start_server(tcp_echo_until_eof, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        host = tcp_host.TcpHost(engine, loop)
        try:
            for index in range(CONNECTIONS):
                conn = GuestTcp(net, 30000 + index, GATEWAY, port)
                net.conns[conn.local_port] = conn
                conn.connect()
                conn.send(b"x")
                await run_until(net, engine, host, lambda c=conn: c.received == b"x", timeout=10)
                conn.send(b"", then_close=True)
                await run_until(net, engine, host, lambda c=conn: c.done, timeout=10)
                assert not conn.reset
                del net.conns[conn.local_port]
            await run_until(net, engine, host, lambda: not engine.flows, timeout=10)
            assert host.open_sockets == 0 and host.watched_sockets == 0
            assert engine.next_timer() is None and not engine.commands
            assert engine.counters()["tcp.closed"] == CONNECTIONS
        finally:
            host.close()
            server.close()
            await server.wait_closed()

    loop.run_until_complete(scenario())
    loop.close()
    assert open_fds() == fds_before
    assert len(opened) == CONNECTIONS and all(sock.fileno() == -1 for sock in opened)
    for sock in opened:
        assert sock.options.count((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)) == 1
        assert sock.options.count((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)) == 1
        # SO_RCVLOWAT is 1 on a new socket: set only to move it (never 1 first, never twice).
        lowats = [value for level, option, value in sock.options
                  if (level, option) == (socket.SOL_SOCKET, socket.SO_RCVLOWAT)]
        assert lowats[:1] != [1] and all(a != b for a, b in itertools.pairwise(lowats))


def test_connect_failure_answers_rst_and_releases_the_socket() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    loop, net, engine = new_setup(StackConfig())
    host = tcp_host.TcpHost(engine, loop)

    async def scenario() -> None:
        for index in range(20):
            conn = GuestTcp(net, 31000 + index, GATEWAY, closed_port)
            net.conns[conn.local_port] = conn
            conn.connect()
            await run_until(net, engine, host, lambda c=conn: c.reset, timeout=10)
        assert engine.flows == {} and host.open_sockets == 0 and host.watched_sockets == 0
        assert engine.counters()["tcp.connect_failed"] == 20

    try:
        loop.run_until_complete(scenario())
    finally:
        host.close()
        loop.close()


# ------------------------------------------------------------------ Readiness


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[int, int]] = []

    def __call__(self, fd: int, events: int) -> None:
        self.events.append((fd, events))


def spin(loop: asyncio.AbstractEventLoop, seconds: float = 0.05) -> None:
    loop.run_until_complete(asyncio.sleep(seconds))


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    yield a, b
    a.close()
    b.close()


def test_readiness_fires_once_until_armed_again(pair) -> None:
    """Every registration but reading alone is one-shot."""
    a, b = pair
    loop = asyncio.new_event_loop()
    seen = Recorder()
    readiness = Readiness(loop, seen)
    try:
        readiness.want(a.fileno(), read=False, write=True)
        spin(loop)
        assert seen.events == [(a.fileno(), select.EPOLLOUT)]
        spin(loop)  # still writable, but one-shot: nothing until armed again
        assert len(seen.events) == 1
        readiness.want(a.fileno(), read=False, write=True)
        spin(loop)
        assert len(seen.events) == 2
        b.send(b"data")
        readiness.want(a.fileno(), read=True, write=True)
        spin(loop)
        assert seen.events[-1] == (a.fileno(), select.EPOLLIN | select.EPOLLOUT)
        spin(loop)
        assert len(seen.events) == 3
        assert readiness.watched == 1
        readiness.forget(a.fileno())
        assert readiness.watched == 0
        readiness.want(a.fileno(), read=True, write=False)  # registered anew after forget
        spin(loop)
        assert len(seen.events) >= 4
    finally:
        readiness.close()
        loop.close()


@pytest.fixture
def tcp_pair():
    """A connected loopback TCP pair (SO_RCVLOWAT counts for its readiness, not a UNIX pair's)."""
    listener = socket.create_server(("127.0.0.1", 0))
    b = socket.create_connection(listener.getsockname())
    a, _ = listener.accept()
    listener.close()
    a.setblocking(False)
    yield a, b
    a.close()
    b.close()


def test_readiness_keeps_a_socket_that_reads_alone_armed(tcp_pair) -> None:
    """Reading alone is level-triggered: the socket waits on after its event, with no
    ``epoll_ctl`` to arm it again (the glue's SO_RCVLOWAT keeps seen bytes from firing it),
    until ``want`` stops it."""
    a, b = tcp_pair
    loop = asyncio.new_event_loop()
    seen = Recorder()
    readiness = Readiness(loop, seen)
    try:
        readiness.want(a.fileno(), read=True, write=False)
        assert Readiness.stays_armed(read=True, write=False)
        assert not Readiness.stays_armed(read=True, write=True)
        b.send(b"data")
        spin(loop)
        assert seen.events and seen.events[0] == (a.fileno(), select.EPOLLIN)
        fired = len(seen.events)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 5)  # the 4 bytes were seen
        spin(loop)
        assert len(seen.events) == fired
        ctl_calls = readiness.ctl_calls
        b.send(b"more")  # new bytes fire it again, nothing armed it anew
        spin(loop)
        assert len(seen.events) > fired and seen.events[-1] == (a.fileno(), select.EPOLLIN)
        assert readiness.ctl_calls == ctl_calls
        readiness.want(a.fileno(), read=False, write=False)
        fired = len(seen.events)
        spin(loop)
        assert len(seen.events) == fired
    finally:
        readiness.close()
        loop.close()


def test_readiness_a_socket_that_waits_for_nothing_does_not_fire_at_its_hang_up(tcp_pair) -> None:
    """A socket at EOF that stops reading waits for nothing: its hang-up (which epoll reports
    whatever the mask) must not wake the handler, as it did once per short connection."""
    a, b = tcp_pair
    loop = asyncio.new_event_loop()
    seen = Recorder()
    readiness = Readiness(loop, seen)
    try:
        readiness.want(a.fileno(), read=True, write=False)
        b.close()  # the peer's FIN ...
        a.shutdown(socket.SHUT_WR)  # ... and ours: the socket is hung up
        time.sleep(0.01)
        spin(loop)
        assert seen.events and seen.events[0][1] & select.EPOLLIN
        readiness.want(a.fileno(), read=False, write=False)
        fired = len(seen.events)
        spin(loop)
        assert len(seen.events) == fired and readiness.watched == 0
        readiness.want(a.fileno(), read=True, write=False)  # wanted again: back in the set
        spin(loop)
        assert len(seen.events) > fired
    finally:
        readiness.close()
        loop.close()


def test_readiness_skips_an_event_of_a_socket_closed_earlier_in_the_batch() -> None:
    loop = asyncio.new_event_loop()
    pairs = [socket.socketpair() for _ in range(2)]
    first, second = pairs[0][0], pairs[1][0]
    handled: list[int] = []

    def on_event(fd: int, events: int) -> None:
        handled.append(fd)
        readiness.want(fd, read=False, write=False)  # (read alone stays armed: stop it)
        other = second if fd == first.fileno() else first
        readiness.closing(other.fileno())  # handling one closes the other
        other.close()

    readiness = Readiness(loop, on_event)
    try:
        for sock, peer in pairs:
            readiness.want(sock.fileno(), read=True, write=False)
            peer.send(b"x")
        time.sleep(0.01)
        spin(loop)
        assert len(handled) == 1 and readiness.watched == 0  # the one handled: out of the set
    finally:
        readiness.close()
        loop.close()
        for sock, peer in pairs:
            sock.close()
            peer.close()


def test_a_loopback_connect_answers_the_syn_in_the_same_flush() -> None:
    """The kernel finishes a loopback handshake inside connect(): the SYN-ACK needs no wait
    for the socket to turn writable (no loop turn, no epoll registration for it)."""
    loop, net, engine = new_setup(StackConfig())
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    host = tcp_host.TcpHost(engine, loop)
    try:
        conn = GuestTcp(net, 32000, GATEWAY, listener.getsockname()[1])
        net.conns[conn.local_port] = conn
        conn.connect()
        net.deliver(engine, 1.0)  # the SYN: a Connect command
        host.flush()  # connect(), then at once the SYN-ACK
        net.deliver(engine, 1.0)  # the guest takes it and ACKs
        assert conn.established and not conn.reset
        assert engine.counters()["tcp.established"] == 1
        assert host.watched_sockets == 1  # armed for reading only
    finally:
        host.close()
        listener.close()
        loop.close()


# ------------------------------------------------------------- control frames in C


@pytest.mark.parametrize("family", [4, 16])
def test_control_frames_built_in_c_match_the_python_segment(family: int) -> None:
    """ACK, FIN, RST... to the guest are built whole in C (``_frames.control_frame``): the
    TCP segment is byte for byte what ``emit_segment`` builds, the IPv4 header sums to 0."""
    rng = random.Random(family)
    ip_len = 20 if family == 4 else 40
    for flags in (ACK, FIN | ACK, RST, RST | ACK, ACK | PSH, SYN | ACK, 0):
        for _ in range(200):
            src, dst = rng.randbytes(family), rng.randbytes(family)
            sport, dport = rng.getrandbits(16), rng.getrandbits(16)
            seq, ack, window = rng.getrandbits(32), rng.getrandbits(32), rng.getrandbits(17)
            frame = control_frame(b"\x02" * 6, b"\x52" * 6, src, dst, sport, dport, seq, ack,
                                  flags, window)
            assert len(frame) == 14 + ip_len + 20
            assert frame[14 + ip_len:] == emit_segment(src, dst, sport, dport, seq, ack, flags,
                                                       min(window, 0xFFFF))
            if family == 4:
                assert internet_checksum(frame[14:34]) == 0
                assert frame[14 + 12:14 + 20] == src + dst


@pytest.mark.parametrize("family", [4, 16])
def test_syn_frames_with_options_built_in_c_match_the_python_segment(family: int) -> None:
    """SYN and SYN-ACK carry their options through the same C builder: the data offset
    covers them, lengths and checksums count them, the segment is ``emit_segment``'s."""
    rng = random.Random(family + 1)
    ip_len = 20 if family == 4 else 40
    for options in (build_options(1460, 7), build_options(1440, None), build_options(536, 14, True),
                    b"", bytes(40)):
        for flags in (SYN, SYN | ACK):
            src, dst = rng.randbytes(family), rng.randbytes(family)
            seq, ack = rng.getrandbits(32), rng.getrandbits(32)
            frame = control_frame(b"\x02" * 6, b"\x52" * 6, src, dst, 40000, 80, seq, ack,
                                  flags, 64240, options)
            assert len(frame) == 14 + ip_len + 20 + len(options)
            assert frame[14 + ip_len:] == emit_segment(src, dst, 40000, 80, seq, ack, flags,
                                                       64240, b"", options)
            if family == 4:
                assert internet_checksum(frame[14:34]) == 0
    with pytest.raises(ValueError):
        control_frame(b"\x02" * 6, b"\x52" * 6, bytes(4), bytes(4), 1, 2, 0, 0, SYN, 0, b"\x01")


def test_engine_acks_go_out_as_whole_frames_once_the_guest_mac_is_known() -> None:
    stack = build_stack(StackConfig())
    engine = TcpEngine(stack.config, stack)
    flow = engine.add_flow((GUEST_IP, 1234, GATEWAY, 80), inbound=False,
                           phase=Phase.ESTABLISHED)
    engine.tx.ack(flow)  # no guest MAC yet: the stack's way (broadcast, with an ARP request)
    assert stack.counters().get("ipv4.tx.broadcast") == 1
    stack.frames_to_guest.clear()
    stack.guest_mac = b"\x02\x00\x00\x00\x00\x0f"
    engine.tx.ack(flow)
    (frame,) = list(stack.frames_to_guest)
    assert frame[:6] == stack.guest_mac and frame[6:12] == stack.config.gateway_mac
    assert frame[14 + 20 + 13] == ACK
    assert engine.counters()["tcp.segments_out"] == 2
