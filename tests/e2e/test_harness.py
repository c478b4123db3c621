"""The harness itself: the kit boots in both QEMU versions, without vhostnet."""

from __future__ import annotations

import socket
import subprocess

import pytest

from tests.e2e.guestlib import GUEST_MARKERS, GuestRun, script_exit_code
from tests.e2e.hostservers import LOOPBACK, PacedHttpServer, generated_bytes
from tools.guestkit import CpioWriter, script_archive
from tools.netns import interfaces
from tools.qemu import GuestError, parse_results

pytestmark = pytest.mark.e2e

BOOT_SCRIPT = """
echo "RESULT kernel=$(uname -r)"
if lsmod | grep -q '^virtio_net '; then echo RESULT virtio_net=loaded; else echo RESULT virtio_net=missing; fi
if [ -x /usr/share/udhcpc/default.script ]; then echo RESULT udhcpc_script=present; fi
echo "RESULT interfaces=$(ls /sys/class/net | tr '\\n' ' ')"
exit 3
"""


def test_guest_boots(guest, kit, qemu_version, e2e_tmp):
    """No network device: the markers, the script's RESULT lines and its exit code arrive."""
    machine = guest(qemu_version, BOOT_SCRIPT, qmp_path=e2e_tmp / "qmp.sock")
    # QMP is up long before the kernel reaches /init (seconds under TCG).
    assert machine.qmp("query-status")["status"] == "running"
    code = machine.wait_exit(timeout=120)
    output = machine.output()
    run = GuestRun(machine.results(), output, code, script_exit_code(output))
    run.check_completed()
    for marker in GUEST_MARKERS:
        assert marker in run.output
    assert run.qemu_exit_code == 0, "poweroff -f should make QEMU exit cleanly"
    assert run.script_exit_code == 3
    assert run.results["kernel"] == kit.kernel_version
    assert run.results["virtio_net"] == "loaded"
    assert run.results["udhcpc_script"] == "present"
    assert run.results["interfaces"].split() == ["lo"]


def test_namespace_has_only_loopback():
    assert interfaces() == ["lo"]


def test_parse_results_takes_last_value_and_ignores_noise():
    text = "boot noise\r\nRESULT a=1\r\nxRESULT b=2\nRESULT a=two words \nRESULT c=\n"
    assert parse_results(text) == {"a": "two words", "c": ""}


def test_script_archive_is_a_valid_newc_archive(tmp_path):
    data = script_archive("echo hi\n")
    listing = subprocess.run(["cpio", "-i", "-t", "--quiet"], input=data,
                             capture_output=True, timeout=30, check=True)
    assert listing.stdout.decode().split() == ["test.sh"]
    subprocess.run(["cpio", "-i", "--quiet", "-D", str(tmp_path)], input=data,
                   capture_output=True, timeout=30, check=True)
    unpacked = tmp_path / "test.sh"
    assert unpacked.read_text() == "echo hi\n"
    assert unpacked.stat().st_mode & 0o111


def test_cpio_writer_pads_every_entry_to_four_bytes():
    archive = CpioWriter()
    archive.file("abc", b"12345")
    archive.symlink("link", "/x")
    data = archive.finish()
    assert len(data) % 4 == 0
    assert data.count(b"070701") == 3


def test_waits_are_bounded_and_show_the_console(guest):
    machine = guest("7.2", "sleep 600\n")
    with pytest.raises(GuestError, match="did not appear within 1 s"):
        machine.wait_for("NEVER-PRINTED", timeout=1)
    with pytest.raises(GuestError, match="still running"):
        machine.wait_exit(timeout=1)
    machine.kill()
    assert not machine.running()


def test_a_released_paced_server_sends_the_rest_unpaced():
    """Paced over an hour, held at half: after release() the rest arrives at once (a test
    waits for its event, not for the pace)."""
    data = generated_bytes(256 * 1024, seed=5)
    with (PacedHttpServer("paced", data, seconds=3600.0, hold_at=len(data) // 2) as server,
          socket.create_connection((LOOPBACK, server.port), timeout=30) as conn):
        conn.sendall(b"GET /paced HTTP/1.0\r\n\r\n")
        received = b""
        while len(received) < 64 * 1024:  # the first chunk goes out at once
            received += conn.recv(65536)
        server.release()
        conn.shutdown(socket.SHUT_WR)
        while chunk := conn.recv(65536):
            received += chunk
    assert received.endswith(data) and server.sent == len(data)
