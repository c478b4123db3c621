"""Hostile front-ends against the real vhostnet process (issue 15).

Each test plays a front-end that does something QEMU never does (a region
its file cannot back, a kick fd that is a file, a call fd nobody reads, ...)
and checks that vhostnet refuses it, loses nothing (fds, memory, other
connections) and keeps answering.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import logging
import os
import resource
import socket
import threading
import time
import weakref
from pathlib import Path

import pytest

from testkit.frontend import Frontend
from tests.support.daemon import VhostnetProcess, gateway_mac, run_cli
from tests.support.dns import query
from tests.support.frames import DNS_IP, GATEWAY_IP, guest_udp_frame, parse_udp_frame
from tests.support.vhost_user import RecordingDevice
from vhostnet import cli, control
from vhostnet.control import control_request
from vhostnet.migration.transfer import LOAD
from vhostnet.network import MAX_TICK, Network
from vhostnet.server import Server, open_listening_socket
from vhostnet.stack import dns
from vhostnet.stack.config import StackConfig
from vhostnet.vhost_user.backend import CLOSE, BackendHandler
from vhostnet.vhost_user.codec import U64, MemoryTable, Message
from vhostnet.vhost_user.protocol import NEED_REPLY, VERSION, ProtocolFeature, Request
from vhostnet.vhost_user.ratelimit import limiter

CONNECTIONS = 20



def fd_count(server: VhostnetProcess) -> int:
    return len(os.listdir(f"/proc/{server.process.pid}/fd"))


def steady_fd_count(server: VhostnetProcess, seconds: float = 5.0) -> int:
    """The process's fd count once two reads 0.2 s apart agree (a control connection
    just answered may still be closing), or the last seen after ``seconds``."""
    deadline = time.monotonic() + seconds
    count = fd_count(server)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        previous, count = count, fd_count(server)
        if count == previous:
            break
    return count


def settled_fd_count(server: VhostnetProcess, expected: int, seconds: float = 5.0) -> int:
    """The process's fd count once it reaches ``expected`` (closing is asynchronous), or the last seen."""
    deadline = time.monotonic() + seconds
    count = fd_count(server)
    while count != expected and time.monotonic() < deadline:
        time.sleep(0.05)
        count = fd_count(server)
    return count


def status(reply) -> int:
    assert reply is not None
    return U64.parse(reply.payload).value


def test_unmappable_region_closes_every_fd_of_the_table(server: VhostnetProcess) -> None:
    # The first region claims more than its memfd holds; the second is fine.
    baseline = steady_fd_count(server)
    for _ in range(CONNECTIONS):
        with Frontend(server.socket_path, memory_size=16 << 20, use_mem_slots=False) as frontend:
            frontend.connect()
            regions = frontend.memory.memory_regions()
            too_big = dataclasses.replace(regions[0], mmap_offset=64 << 20)
            table = MemoryTable((too_big, *regions[1:]))
            reply = frontend.request(Request.SET_MEM_TABLE, table.emit(),
                                     [frontend.memory.fd] * len(regions), need_reply=True)
            assert status(reply) != 0
    assert settled_fd_count(server, baseline) == baseline
    assert server.stats()["vhost_user.bad_memory_region"] == CONNECTIONS


def test_kick_fd_that_is_a_file_is_refused_and_the_old_one_closed(server: VhostnetProcess) -> None:
    pairs = 200
    with Frontend(server.socket_path) as frontend:
        frontend.connect()
        frontend.start()
        baseline = steady_fd_count(server)
        memfd = os.memfd_create("not-an-eventfd", os.MFD_CLOEXEC)
        try:
            for _ in range(pairs):
                kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                try:
                    reply = frontend.request(Request.SET_VRING_KICK, U64(1).emit(), [kick], need_reply=True)
                finally:
                    os.close(kick)
                assert status(reply) == 0
                reply = frontend.request(Request.SET_VRING_KICK, U64(1).emit(), [memfd], need_reply=True)
                assert status(reply) != 0
        finally:
            os.close(memfd)
        # At most the last good kick eventfd more than at the start.
        assert fd_count(server) <= baseline + 1
        assert server.stats()["vhost_user.bad_vring_fd"] == pairs


def cpu_seconds(server: VhostnetProcess) -> float:
    fields = Path(f"/proc/{server.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_kick_fd_that_is_a_pipe_at_eof_is_refused(server: VhostnetProcess) -> None:
    with Frontend(server.socket_path) as frontend:
        frontend.connect()
        frontend.start()
        read_end, write_end = os.pipe()
        os.close(write_end)
        try:
            reply = frontend.request(Request.SET_VRING_KICK, U64(1).emit(), [read_end], need_reply=True)
        finally:
            os.close(read_end)
        assert status(reply) != 0
        before = cpu_seconds(server)
        time.sleep(1.0)
        # A reader left on a pipe at EOF would fire without end: a whole second of CPU.
        assert cpu_seconds(server) - before < 0.5
        assert "counters" in control_stats(server)


def control_stats(server: VhostnetProcess, timeout: float = 2.0) -> dict:
    return control_request(server.control_path, "stats", timeout=timeout)


def test_full_blocking_call_fd_does_not_block_the_process(server: VhostnetProcess) -> None:
    with Frontend(server.socket_path) as frontend:
        frontend.connect()
        frontend.start()
        # A blocking eventfd at its maximum count: write(2) on it would wait for ever.
        full = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            os.eventfd_write(full, 0xFFFF_FFFF_FFFF_FFFE)
            frontend.request(Request.SET_VRING_CALL, U64(0).emit(), [full])
            frontend.request(Request.SET_VRING_CALL, U64(1).emit(), [full])
            # The loop still answers: the control socket and the vhost-user socket.
            assert "counters" in control_stats(server)
            assert status(frontend.request(Request.GET_STATUS)) & 0x4
        finally:
            os.close(full)


def test_timers_survive_running_out_of_fds(tmp_path: Path) -> None:
    """EMFILE while opening UDP flows inside the timer's flush must not end the timer:
    a DNS query to a silent upstream still gets its SERVFAIL afterwards."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))  # takes queries, never answers

    async def scenario(loop: asyncio.AbstractEventLoop) -> None:
        network = Network(StackConfig(dns_upstream=[silent.getsockname()]), loop)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
            try:
                for port in range(40000, 40040):  # 40 flows, room for 8 sockets
                    network.stack.receive_frame(guest_udp_frame(5000, GATEWAY_IP, port, b"x"),
                                                 time.monotonic())
                await asyncio.sleep(3 * MAX_TICK)  # the timer's flush meets EMFILE
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            network.frames_to_guest.clear()
            network.stack.receive_frame(guest_udp_frame(5353, DNS_IP, 53, query()), time.monotonic())
            deadline = time.monotonic() + dns.OVERALL_TIMEOUT + 3
            while time.monotonic() < deadline:
                frames = [f if isinstance(f, bytes) else f[0] for f in network.frames_to_guest]
                if any(parse_udp_frame(f)[1] == 53 for f in frames if f[12:14] == b"\x08\x00" and f[23] == 17):
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail("no SERVFAIL for the DNS query: the network timer stopped")
            assert network.counters()["udp.host_error"] > 0  # the flows that met EMFILE failed
        finally:
            network.close()

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(scenario(loop))
    finally:
        loop.close()
        silent.close()


def test_default_flow_limit_follows_the_fd_limit() -> None:
    assert cli.flow_limit_for(20000) < 20000 // 2
    assert cli.flow_limit_for(1 << 20) == 65536
    args = cli.build_parser().parse_args(["--socket", "/tmp/x.sock", "--dns-upstream", "127.0.0.1"])
    assert cli.config_from_args(args, fd_limit=4096).flow_limit == cli.flow_limit_for(4096)


def test_check_device_state_with_a_silent_open_pipe_does_not_stall(server: VhostnetProcess) -> None:
    with Frontend(server.socket_path, timeout=2.0) as frontend:
        frontend.connect()
        assert frontend.has(ProtocolFeature.DEVICE_STATE)
        for _ in range(4):
            read_end, write_end = os.pipe()  # the writer stays open and says nothing
            try:
                frontend.set_device_state_fd(LOAD, read_end)
                os.close(read_end)
                # Answered (a failure) within the front-end's 2 s timeout, not after a 5 s wait.
                assert status(frontend.request(Request.CHECK_DEVICE_STATE)) != 0
            finally:
                os.close(write_end)
        assert "counters" in control_stats(server)


def test_closed_connection_is_freed_without_the_garbage_collector(tmp_path: Path) -> None:
    path = str(tmp_path / "vn.sock")
    loop = asyncio.new_event_loop()
    network = Network(StackConfig(dns_upstream=[]), loop)
    server = Server(loop, open_listening_socket(path), network)
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    gc.disable()  # only reference counting: a cycle would keep everything alive
    try:
        refs = []
        for _ in range(3):
            with Frontend(path) as frontend:
                frontend.connect()
                frontend.start()
                connection = server.active
                assert connection is not None
                refs += [weakref.ref(connection), weakref.ref(connection.device),
                         weakref.ref(connection.handler), weakref.ref(connection.device.memory)]
                del connection
        deadline = time.monotonic() + 5
        while any(ref() is not None for ref in refs) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [ref() for ref in refs if ref() is not None] == []
    finally:
        gc.enable()
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def test_guest_memory_shrunk_under_vhostnet_ends_only_that_connection(server: VhostnetProcess) -> None:
    frontend = Frontend(server.socket_path)
    try:
        frontend.connect()
        frontend.start()
        gateway_mac(frontend)  # the data path works
        # The memfd is not sealed: cut it to nothing under vhostnet's mapping. From
        # here on this process must not touch its own mapping either.
        os.ftruncate(frontend.memory.fd, 0)
        os.eventfd_write(frontend.kick_fds[1], 1)
        assert frontend.sock is not None
        frontend.sock.settimeout(5)
        assert frontend.sock.recv(1) == b""  # vhostnet closed this connection
    finally:
        frontend.close()
    with Frontend(server.socket_path) as second:
        second.connect()
        second.start()
        gateway_mac(second)
        # A second fault in the same thread is caught too (SIGBUS unblocked after the first
        # jump out of the handler; else the kernel kills the process).
        os.ftruncate(second.memory.fd, 0)
        os.eventfd_write(second.kick_fds[1], 1)
        assert second.sock is not None
        second.sock.settimeout(5)
        assert second.sock.recv(1) == b""
    with Frontend(server.socket_path) as third:
        third.connect()
        third.start()
        gateway_mac(third)
    log = server.log_path.read_text()
    assert log.count("guest memory vanished") == 2, log
    assert server.stats()["vq1.guest_memory_fault"] == 2


class FailingDevice(RecordingDevice):
    """A device with a bug: every SET_FEATURES raises."""

    def features_set(self, features: int) -> None:
        raise RuntimeError("device bug")


def test_device_errors_are_logged_once_without_traceback_across_connections(caplog) -> None:
    caplog.set_level(logging.INFO)
    limiter.reset()
    for _ in range(5):  # five connections, each hitting the bug twice
        handler = BackendHandler(FailingDevice())
        for _ in range(2):
            replies = handler.handle(Message(Request.SET_FEATURES, VERSION | NEED_REPLY, U64(0).emit(), []))
            assert replies != CLOSE
        assert handler.counters["device_error"] == 2
        handler.close()
    failures = [r for r in caplog.records if "device bug" in r.getMessage()]
    assert len(failures) == 1
    assert failures[0].exc_info is None


def control_line(sock: socket.socket, data: bytes) -> dict:
    sock.sendall(data + b"\n")
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = sock.recv(65536)
        assert chunk, "control socket closed the connection"
        reply += chunk
    return json.loads(reply)


def test_control_socket_refuses_deep_nesting_and_keeps_the_client(server: VhostnetProcess) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        sock.connect(server.control_path)
        reply = control_line(sock, b"[" * 20000 + b"]" * 20000)
        assert reply["ok"] is False and "nested" in reply["error"]
        assert control_line(sock, b'{"command": "stats"}')["ok"] is True


def test_idle_control_clients_do_not_lock_stats_out(server: VhostnetProcess) -> None:
    idle = []
    try:
        for _ in range(control.MAX_CLIENTS + 2):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(server.control_path)
            idle.append(sock)
        time.sleep(0.2)  # all accepted and waiting
        assert control_stats(server)["ok"] is True
    finally:
        for sock in idle:
            sock.close()


def test_empty_socket_path_is_refused() -> None:
    result = run_cli("--socket", "")
    assert result.returncode == 2
    assert "--socket needs a path" in result.stderr


def test_vhostnet_starts_no_openblas_threads() -> None:
    """numpy loads OpenBLAS, which would start a thread per core at import for nothing (no
    linear algebra here): importing vhostnet keeps the process at one thread."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    script = "import os, vhostnet.cli, numpy; print(len(os.listdir('/proc/self/task')))"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=60, check=True, cwd=Path(__file__).parent.parent)
    assert out.stdout.strip() == "1"
