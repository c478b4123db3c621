"""The harness itself: the kit boots in both QEMU versions, without vhostnet."""

from __future__ import annotations

import subprocess

import pytest

from tests.e2e.guestlib import GUEST_MARKERS
from tools.guestkit import CpioWriter, script_archive
from tools.netns import interfaces
from tools.qemu import parse_results

pytestmark = pytest.mark.e2e

BOOT_SCRIPT = """
echo "RESULT kernel=$(uname -r)"
if lsmod | grep -q '^virtio_net '; then echo RESULT virtio_net=loaded; else echo RESULT virtio_net=missing; fi
if [ -x /usr/share/udhcpc/default.script ]; then echo RESULT udhcpc_script=present; fi
echo "RESULT interfaces=$(ls /sys/class/net | tr '\\n' ' ')"
exit 3
"""


def test_guest_boots(run_guest, kit, qemu_version):
    """No network device: the markers, the script's RESULT lines and its exit code arrive."""
    run = run_guest(qemu_version, BOOT_SCRIPT, timeout=120)
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
