"""Hostile front-ends against the real vhostnet process (issue 15).

Each test plays a front-end that does something QEMU never does (a region
its file cannot back, a kick fd that is a file, a call fd nobody reads, ...)
and checks that vhostnet refuses it, loses nothing (fds, memory, other
connections) and keeps answering.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_server import VhostnetProcess
from vhostnet.control import control_request
from vhostnet.vhost_user.codec import U64, MemoryTable
from vhostnet.vhost_user.frontend import Frontend
from vhostnet.vhost_user.protocol import Request

CONNECTIONS = 20


@pytest.fixture
def server(tmp_path: Path) -> Iterator[VhostnetProcess]:
    process = VhostnetProcess(tmp_path)
    try:
        yield process
    finally:
        alive = process.process.poll() is None
        try:
            code = process.stop()
        except subprocess.TimeoutExpired:  # stuck (in a blocking write): not a clean exit
            process.process.kill()
            process.process.wait(timeout=10)
            raise
        assert alive, f"vhostnet died during the test:\n{process.log_path.read_text()}"
        assert code == 0, process.log_path.read_text()


def fd_count(server: VhostnetProcess) -> int:
    return len(os.listdir(f"/proc/{server.process.pid}/fd"))


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
    baseline = fd_count(server)
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
        baseline = fd_count(server)
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
