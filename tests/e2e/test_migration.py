"""Live migration of a guest between two QEMUs, each on its own vhostnet.

The guest pings the gateway the whole time; replies must continue on the
destination with new sequence numbers. Once they have, the test types a line on
the destination's console that ends the ping (its count only bounds a slow host).
The destination QEMU starts while the source boots (`-incoming defer` waits). QEMU 10.0 carries vhostnet's network
state itself (DEVICE_STATE); with QEMU 7.2 the state moves through the
control sockets (save-state on the source, load-state on the destination)
while the destination waits paused (-S) for `cont`.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.e2e.guestlib import (
    GATEWAY,
    PING_REPLY,
    STOP_PING_LINE,
    destination_diagnosis,
    ping_replies,
    ping_until_stopped,
    static_ipv4,
)
from tests.support.qmp import wait_migrated
from tools.qemu import GuestError
from vhostnet.control import control_request

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PING_COUNT = 120
PING_INTERVAL = 0.5
REPLIES_BEFORE = 3

SCRIPT = static_ipv4() + ping_until_stopped(GATEWAY, PING_COUNT, PING_INTERVAL)
REPLY = re.compile(PING_REPLY.format(target=re.escape(GATEWAY)), re.MULTILINE)


def boot_source(source):
    offset = source.wait_for("VHOSTNET-TEST-BEGIN", timeout=120).end()
    for _ in range(REPLIES_BEFORE):
        offset = source.wait_for(REPLY, timeout=60, start=offset).end()
    return source


def check_ping_continued(source, destination, destination_control: Path) -> None:
    try:
        destination.wait_for(REPLY, timeout=60)
    except GuestError as error:
        pytest.fail(f"{error}\n{destination_diagnosis(destination, destination_control)}")
    destination.type_line(STOP_PING_LINE)
    destination.wait_exit(timeout=120)
    before = ping_replies(source.output(), GATEWAY)
    after = ping_replies(destination.output(), GATEWAY)
    assert len(before) >= REPLIES_BEFORE
    assert after, "no echo reply on the destination"
    assert min(after) > max(before), "replies after migration must be new sequence numbers"
    assert destination.results().get("ping_done") == "yes"
    assert destination.results().get("ping_rc") == "0"


def start_pair(guest, version: str, source_socket: Path, destination_socket: Path,
               tmp_path: Path, incoming: tuple[str, ...]):
    """The source QEMU booting, and the destination started beside it, waiting for
    the migration (`incoming`: its -incoming arguments)."""
    source = guest(version, SCRIPT, socket_path=source_socket, qmp_path=tmp_path / "src.qmp")
    destination = guest(version, SCRIPT, socket_path=destination_socket,
                        qmp_path=tmp_path / "dst.qmp", extra_args=incoming,
                        console_input=True)
    return source, destination


def test_migration_with_device_state(vhostnet, guest, kit, tmp_path):
    if kit.qemu10 is None:
        pytest.fail(f"QEMU 10.0 is needed for DEVICE_STATE: {kit.qemu10_reason}")
    dst_ctl = tmp_path / "dst.ctl"
    src_net, dst_net = vhostnet(), vhostnet("--control", str(dst_ctl))
    source, destination = start_pair(guest, "10.0", src_net.socket_path, dst_net.socket_path,
                                     tmp_path, ("-incoming", "defer"))
    boot_source(source)
    uri = f"unix:{tmp_path / 'migration.sock'}"
    destination.qmp("migrate-incoming", uri=uri)
    source.qmp("migrate", uri=uri)
    wait_migrated(source)
    check_ping_continued(source, destination, dst_ctl)
    assert "device state: saving" in src_net.log_text()
    assert "network state loaded: guest 52:54:00" in dst_net.log_text()
    assert src_net.running() and dst_net.running()


def test_migration_with_control_sockets_qemu72(vhostnet, guest, tmp_path):
    src_ctl, dst_ctl = tmp_path / "src.ctl", tmp_path / "dst.ctl"
    src_net = vhostnet("--control", str(src_ctl))
    dst_net = vhostnet("--control", str(dst_ctl))
    source, destination = start_pair(guest, "7.2", src_net.socket_path, dst_net.socket_path,
                                     tmp_path, ("-S", "-incoming", "defer"))
    boot_source(source)
    uri = f"unix:{tmp_path / 'migration.sock'}"
    destination.qmp("migrate-incoming", uri=uri)
    source.qmp("migrate", uri=uri)
    wait_migrated(source)
    # Inline: vhostnet, as nobody under seccomp, creates no file.
    saved = control_request(str(src_ctl), "save-state")
    assert saved["ok"], saved
    loaded = control_request(str(dst_ctl), "load-state", state=saved["state"])
    assert loaded["ok"], loaded
    destination.qmp("cont")
    check_ping_continued(source, destination, dst_ctl)
    assert "network state loaded: guest 52:54:00" in dst_net.log_text()
