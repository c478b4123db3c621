"""--state-file: the state written at SIGTERM, read back at start; bad files set aside."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import REPO, VhostnetProcess
from vhostnet.migration.restart import StateFile, restore_at_start, save_on_exit
from vhostnet.migration.state import decode_state
from vhostnet.migration.tcp_migrate import TcpMigration
from vhostnet.network import Network
from vhostnet.stack.config import StackConfig

GUEST_MAC = bytes.fromhex("525400abcdef")


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def network_on(loop: asyncio.AbstractEventLoop) -> tuple[Network, TcpMigration]:
    network = Network(StackConfig(tcp_forwards=[]), loop)
    return network, TcpMigration.attach(network)


def test_the_state_is_written_whole_and_private(tmp_path: Path) -> None:
    path = tmp_path / "state"
    state = StateFile.open(str(path))  # created empty: no state
    assert not state.pending and path.read_bytes() == b""
    state.write(b"a longer state than the next")
    state.write(b"new state")
    state.close()
    assert path.read_bytes() == b"new state"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["state"]  # no temporary left behind


def test_the_state_file_is_written_after_root_is_dropped(tmp_path: Path) -> None:
    """Opened by root in a folder only root may write, written by nobody under the filter."""
    os.chmod(tmp_path, 0o700)
    path = tmp_path / "state"
    code = ("import os, sys; from vhostnet import sandbox; "
            "from vhostnet.migration.restart import StateFile; "
            "state = StateFile.open(sys.argv[1]); sandbox.drop_privileges((65534, 65534)); "
            "sandbox.install_seccomp(); state.write(b'saved as nobody'); state.close()")
    result = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert path.read_bytes() == b"saved as nobody" and path.stat().st_uid == 0


def test_saved_state_is_restored_and_removed(tmp_path: Path, loop) -> None:
    path = str(tmp_path / "state")
    source, source_migration = network_on(loop)
    source.stack.guest_mac = GUEST_MAC
    saved = StateFile.open(path)
    assert save_on_exit(source, source_migration, saved) == 0
    saved.close()
    assert decode_state(Path(path).read_bytes())["guest"]["mac"] == GUEST_MAC.hex(":")
    source.close()

    target, target_migration = network_on(loop)
    restored = StateFile.open(path)
    assert restored.pending
    loaded = loop.run_until_complete(restore_at_start(target, target_migration, restored))
    restored.close()
    assert loaded == {"udp_flows": 0, "tcp_restored": 0, "tcp_reset": 0}
    assert target.stack.guest_mac == GUEST_MAC
    assert os.path.getsize(path) == 0  # emptied: kept open for the next save
    target.close()


@pytest.mark.parametrize("content", [b"not a state at all\n", b"VHNETSTA" + bytes(40)])
def test_a_corrupt_state_file_is_set_aside_with_one_line(tmp_path: Path, loop, caplog,
                                                         content: bytes) -> None:
    path = tmp_path / "state"
    path.write_bytes(content)
    network, migration = network_on(loop)
    with caplog.at_level(logging.INFO, logger="vhostnet"):
        state = StateFile.open(str(path))
        assert loop.run_until_complete(restore_at_start(network, migration, state)) is None
    state.close()
    lines = [r for r in caplog.records if "state file" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.ERROR, caplog.text
    assert "starting fresh" in lines[0].getMessage()
    assert path.read_bytes() == b"" and (tmp_path / "state.bad").read_bytes() == content
    assert network.stack.guest_mac is None
    network.close()


@pytest.mark.parametrize("content", [None, b""])
def test_no_state_file_or_an_empty_one_is_a_fresh_start(tmp_path: Path, loop, caplog,
                                                        content: bytes | None) -> None:
    path = tmp_path / "state"
    if content is not None:
        path.write_bytes(content)
    network, migration = network_on(loop)
    state = StateFile.open(str(path))
    assert not state.pending
    assert loop.run_until_complete(restore_at_start(network, migration, state)) is None
    state.close()
    assert "state file" not in caplog.text and os.listdir(tmp_path) == ["state"]
    network.close()


def test_the_daemon_saves_at_sigterm_and_restores_at_start(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.write_bytes(b"garbage from somewhere else")
    first = VhostnetProcess(tmp_path, "--state-file", str(state))
    try:
        assert first.stats() is not None  # started fresh
    finally:
        assert first.stop() == 0  # SIGTERM
    log = first.log_path.read_text()
    assert log.count("starting fresh") == 1, log
    assert (tmp_path / "state.bad").read_bytes() == b"garbage from somewhere else"
    assert "state saved to" in log and state.exists(), log
    assert stat.S_IMODE(state.stat().st_mode) == 0o600

    second = VhostnetProcess(tmp_path, "--state-file", str(state))
    try:
        deadline = time.monotonic() + 20  # the control socket listens before the restore
        while "restarted from" not in second.log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "restarted from" in second.log_path.read_text()
        assert state.read_bytes() == b""  # restored before serving, then emptied
    finally:
        second.process.kill()
        second.stop()


def test_a_front_end_arriving_after_a_restore_finds_frames_waiting(loop) -> None:
    from vhostnet.device import NetDevice

    network, _ = network_on(loop)
    network.frames_to_guest.append(bytes(60))  # what restored connections queued
    device = NetDevice(loop, network)  # listens at once: the queue is not empty
    device.close()
    network.close()
