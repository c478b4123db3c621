"""Fixtures shared by the tests; helpers live in tests/support/."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import VhostnetProcess
from tests.support.guest_ram import SPLIT_LAYOUT, GuestRam
from tools.guestkit import KitError, PasstRepair, fetch_passt_repair


@pytest.fixture
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VhostnetProcess]:
    """A vhostnet process; extra command-line options through indirect parametrization:
    ``@pytest.mark.parametrize("server", [("-m", "9000")], indirect=True)``."""
    process = VhostnetProcess(tmp_path, *getattr(request, "param", ()))
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


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected pair of non-blocking UNIX stream sockets, (ours, peer): a stream link's
    two ends for the stream sender's tests."""
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    peer.setblocking(False)
    yield ours, peer
    ours.close()
    peer.close()


@pytest.fixture(scope="session")
def passt_repair() -> PasstRepair:
    """passt's own passt-repair (Debian trixie, run through trixie's loader), from the
    kit cache; skipped, with the reason printed, when trixie's packages cannot be had
    (an optional tool)."""
    try:
        return fetch_passt_repair()
    except (KitError, OSError) as error:
        reason = f"passt-repair from Debian trixie unavailable: {error}"
        print(reason)
        pytest.skip(reason)


@pytest.fixture
def ram():
    """Guest RAM (memfd) with split-ring layout, for the direct RX tests (TCP and UDP)."""
    guest_ram = GuestRam(SPLIT_LAYOUT)
    yield guest_ram
    guest_ram.close()
