"""The TCP_REPAIR helper (`vhostnet repair SOCKET`) against vhostnet's end, HelperLink.

The helper is a real subprocess; the sockets it switches are real loopback
connections of this process, passed over the UNIX socket as descriptors.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import REPO as REPO_ROOT
from vhostnet.migration.repair_helper import HelperLink, RepairAccess
from vhostnet.migration.tcp_repair import (
    REPAIR_OFF,
    REPAIR_ON,
    TCP_REPAIR,
    RepairError,
    dump_socket,
)

WAIT_SECONDS = 15.0


def repair_mode(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR)


@pytest.fixture
def linked(tmp_path: Path) -> Iterator[tuple[HelperLink, subprocess.Popen[bytes], asyncio.AbstractEventLoop]]:
    loop = asyncio.new_event_loop()
    link = HelperLink(str(tmp_path / "repair.sock"), loop)
    helper = subprocess.Popen([sys.executable, "-m", "vhostnet", "repair", link.path],
                              cwd=REPO_ROOT, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while not link.connected and time.monotonic() < deadline:
            loop.run_until_complete(asyncio.sleep(0.05))
        assert link.connected, "the helper did not connect"
        yield link, helper, loop
    finally:
        link.close()
        try:
            helper.wait(timeout=WAIT_SECONDS)
        finally:
            if helper.poll() is None:
                helper.kill()
        loop.close()


def loopback_pair() -> tuple[socket.socket, socket.socket, socket.socket]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    peer = socket.create_connection(listener.getsockname())
    ours, _ = listener.accept()
    return listener, peer, ours


def test_helper_switches_repair_mode_on_our_sockets(linked) -> None:
    link, helper, _ = linked
    pairs = [loopback_pair() for _ in range(3)]
    ours = [pair[2] for pair in pairs]
    try:
        link.set_repair(ours, REPAIR_ON)
        assert [repair_mode(sock) for sock in ours] == [1, 1, 1]
        dump_socket(ours[0])  # every other repair step works without the capability
        link.set_repair(ours, REPAIR_OFF)
        assert [repair_mode(sock) for sock in ours] == [0, 0, 0]
        ours[0].sendall(b"still a working connection")
        assert pairs[0][1].recv(100) == b"still a working connection"
    finally:
        for pair in pairs:
            for sock in pair:
                sock.close()
    link.close()
    assert helper.wait(timeout=WAIT_SECONDS) == 0, "the helper must end when vhostnet closes"


def test_a_refused_socket_is_reported(linked) -> None:
    link, _, _ = linked
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()  # TCP_REPAIR is refused on a listening socket
    try:
        with pytest.raises(RepairError, match="could not set"):
            link.set_repair([listener], REPAIR_ON)
        assert link.connected, "one refusal must not cost the helper"
    finally:
        listener.close()


def test_without_capability_or_helper_there_is_no_switch(tmp_path: Path) -> None:
    assert RepairAccess(direct=False).switch() is None
    assert "unavailable" in RepairAccess(direct=False).describe()
    loop = asyncio.new_event_loop()
    link = HelperLink(str(tmp_path / "r.sock"), loop)
    try:
        access = RepairAccess(direct=False, helper=link)
        assert access.switch() is None  # not connected yet
        with pytest.raises(RepairError, match="no repair helper"):
            link.set_repair([], REPAIR_ON)
    finally:
        link.close()
        loop.close()
