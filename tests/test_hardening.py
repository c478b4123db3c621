"""Hostile front-ends against the real vhostnet process (issue 15).

Each test plays a front-end that does something QEMU never does (a region
its file cannot back, a kick fd that is a file, a call fd nobody reads, ...)
and checks that vhostnet refuses it, loses nothing (fds, memory, other
connections) and keeps answering.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_server import VhostnetProcess
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
        code = process.stop()
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
