"""TCP_REPAIR helpers against vhostnet's end, HelperLink: `vhostnet repair SOCKET`
and passt's own passt-repair (Debian trixie), which speak the same protocol.

The helper is a real subprocess; the sockets it switches are real loopback
connections of this process, passed over the UNIX socket as descriptors.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import REPO as REPO_ROOT
from tests.support.daemon import VhostnetProcess, nobody_tmp_dir
from tests.support.tcp_repair import connected_pair, open_pair, unacked_bytes
from vhostnet.migration.repair_helper import HelperGone, HelperLink, RepairAccess, freeze_sockets
from vhostnet.migration.tcp_freeze import detach_drop_filters, unfreeze_sockets
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


def helper_command(request: pytest.FixtureRequest, path: str) -> list[str]:
    if request.param == "passt-repair":
        return request.getfixturevalue("passt_repair").command(path)
    return [sys.executable, "-m", "vhostnet", "repair", path]


def start_helper(command: list[str], link: HelperLink,
                 loop: asyncio.AbstractEventLoop) -> subprocess.Popen[bytes]:
    helper = subprocess.Popen(command, cwd=REPO_ROOT, stderr=subprocess.PIPE)
    run_loop_until(loop, lambda: link.connected)
    assert link.connected, "the helper did not connect"
    return helper


def run_loop_until(loop: asyncio.AbstractEventLoop, condition) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition() and time.monotonic() < deadline:
        loop.run_until_complete(asyncio.sleep(0.05))


def stop(helper: subprocess.Popen[bytes]) -> None:
    try:
        helper.wait(timeout=WAIT_SECONDS)
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.wait()


@pytest.fixture(params=["vhostnet repair", "passt-repair"])
def linked(request: pytest.FixtureRequest, tmp_path: Path
           ) -> Iterator[tuple[HelperLink, subprocess.Popen[bytes], asyncio.AbstractEventLoop]]:
    loop = asyncio.new_event_loop()
    link = HelperLink(str(tmp_path / "repair.sock"), loop)
    helper = None
    try:
        helper = start_helper(helper_command(request, link.path), link, loop)
        yield link, helper, loop
    finally:
        link.close()
        if helper is not None:
            stop(helper)
        loop.close()


def test_helper_switches_repair_mode_on_our_sockets(linked) -> None:
    link, helper, _ = linked
    pairs = [open_pair() for _ in range(3)]
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
    link, helper, _ = linked
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()  # TCP_REPAIR is refused on a listening socket
    try:
        if "passt-repair" in " ".join(map(str, helper.args)):
            # passt-repair dies on a refusal: vhostnet loses the helper, and says so.
            with pytest.raises(HelperGone):
                link.set_repair([listener], REPAIR_ON)
            assert not link.connected
            return
        with pytest.raises(RepairError, match="could not set"):
            link.set_repair([listener], REPAIR_ON)
        assert link.connected, "one refusal must not cost the helper"
    finally:
        listener.close()


def test_a_socket_frozen_through_the_helper_takes_no_segments(linked) -> None:
    """passt-repair only switches TCP_REPAIR: the freeze (filter where allowed, closed
    window) is vhostnet's own, or the peer's data is taken after the state was dumped."""
    link, _, _ = linked
    with connected_pair() as (listener, peer, ours):
        frozen = freeze_sockets({0: ours}, link)
        assert list(frozen) == [0] and repair_mode(ours) == 1
        before = dump_socket(ours)
        peer.sendall(b"x" * 1000)
        time.sleep(0.5)  # loopback delivers (and would acknowledge) within microseconds
        assert unacked_bytes(peer) == 1000, "the frozen socket took the peer's segment"
        assert dump_socket(ours).recv_seq == before.recv_seq
        unfreeze_sockets([ours])
        link.set_repair([ours], REPAIR_OFF)
        ours.settimeout(WAIT_SECONDS)
        assert ours.recv(1000) == b"x" * 1000  # retransmitted once thawed


def test_the_helper_is_let_go_after_a_migration_and_a_new_one_may_connect(
        request: pytest.FixtureRequest, linked) -> None:
    link, helper, loop = linked
    RepairAccess(direct=False, helper=link).migration_over()
    assert not link.connected
    assert helper.wait(timeout=WAIT_SECONDS) == 0, "the helper must end when let go"
    again = start_helper(list(map(str, helper.args)), link, loop)
    try:
        listener, peer, ours = open_pair()
        with listener, peer, ours:
            link.set_repair([ours], REPAIR_ON)
            assert repair_mode(ours) == 1
    finally:
        link.close()
        stop(again)


def test_a_helper_that_dies_is_one_log_line_and_no_request_goes_to_it(
        linked, caplog: pytest.LogCaptureFixture) -> None:
    link, helper, loop = linked
    caplog.set_level(logging.INFO, logger="vhostnet.migration.repair_helper")
    helper.kill()
    helper.wait()
    run_loop_until(loop, lambda: not link.connected)
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "disconnected" in lines[0].getMessage(), lines
    listener, peer, ours = open_pair()
    with listener, peer, ours:
        with pytest.raises(HelperGone):
            freeze_sockets({0: ours}, link)
        detach_drop_filters([ours])
        assert repair_mode(ours) == 0


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


# ---- where vhostnet listens for the helper -------------------------------------------


def test_the_repair_socket_is_socket_dot_repair_by_default_as_in_passt(tmp_path: Path,
                                                                         passt_repair) -> None:
    """Created even with CAP_NET_ADMIN (these tests run as root): whoever starts
    passt-repair for a migration does not know vhostnet's privileges."""
    with nobody_tmp_dir() as reachable:
        _serve_the_helper_on_socket_dot_repair(reachable, passt_repair)


def _serve_the_helper_on_socket_dot_repair(tmp_path: Path, passt_repair) -> None:
    vhostnet = VhostnetProcess(tmp_path)
    try:
        path = Path(vhostnet.socket_path + ".repair")
        assert path.is_socket(), vhostnet.log_path.read_text()
        helper = subprocess.Popen(passt_repair.command(str(path)), stderr=subprocess.PIPE)
        deadline = time.monotonic() + WAIT_SECONDS
        while "repair helper connected" not in vhostnet.log_path.read_text():
            assert time.monotonic() < deadline, vhostnet.log_path.read_text()
            time.sleep(0.05)
    finally:
        assert vhostnet.stop() == 0
    stop(helper)  # vhostnet closed the connection: passt-repair ends
    assert helper.returncode == 0
    assert not path.exists(), "the repair socket must go with vhostnet"


def test_repair_path_moves_or_turns_off_the_repair_socket(tmp_path: Path) -> None:
    (tmp_path / "moved").mkdir()
    (tmp_path / "off").mkdir()
    elsewhere = tmp_path / "moved" / "helper.sock"
    moved = VhostnetProcess(tmp_path / "moved", "--repair-path", str(elsewhere))
    off = VhostnetProcess(tmp_path / "off", "--repair-path", "none")
    try:
        assert elsewhere.is_socket()
        assert not Path(moved.socket_path + ".repair").exists()
        assert not Path(off.socket_path + ".repair").exists()
    finally:
        assert moved.stop() == 0 and off.stop() == 0


def test_an_empty_repair_path_is_one_sentence(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "vhostnet", "--socket", str(tmp_path / "s"),
                             "--repair-path", ""], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == "vhostnet: --repair-path needs a path, or 'none'"
    assert not (tmp_path / "s").exists()
