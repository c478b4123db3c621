"""A guest fetches files from vhostnet's TFTP server with busybox `tftp`.

One boot per QEMU version checks: a 5 MiB file at the default block size
(512, lockstep) and at a negotiated large block size, byte-exact (sha256
against the host's copy); a `..` escape refused with an error the guest sees;
and vhostnet's TFTP counters read over the control socket. The transfer rates
the guest measured are printed (not asserted: timing depends on the host).
"""

from __future__ import annotations

import hashlib
import random

import pytest

from tests.e2e.guestlib import GATEWAY, static_ipv4
from vhostnet.control import control_request

pytestmark = pytest.mark.e2e

FILE_NAME = "payload.bin"
# A multiple of 512: the default-size transfer must end with an empty block.
FILE_SIZE = 5 * 1024 * 1024
LARGE_BLOCK = 1468  # 1500-byte MTU minus IP, UDP and TFTP headers
ESCAPE_NAME = "../../etc/passwd"


def _fetch(name: str, remote: str, block_option: str) -> str:
    """Fetch `remote` into /tmp/<name>; RESULT <name>_rc, _sha256, _centis (elapsed 1/100 s)."""
    local = f"/tmp/{name}"
    return (
        f"start=$(cut -d' ' -f1 /proc/uptime | tr -d .)\n"
        f"timeout 120 tftp {block_option} -g -r {remote} -l {local} {GATEWAY} "
        f"> /tmp/{name}.err 2>&1\n"
        f"echo RESULT {name}_rc=$?\n"
        f"end=$(cut -d' ' -f1 /proc/uptime | tr -d .)\n"
        f"echo RESULT {name}_centis=$((end - start))\n"
        f"cat /tmp/{name}.err\n"
        f"if [ -f {local} ]; then echo RESULT {name}_sha256=$(sha256sum {local} | cut -d' ' -f1);"
        f" else echo RESULT {name}_sha256=none; fi\n"
        f"rm -f {local}\n"
    )


GUEST_SCRIPT = (
    static_ipv4()
    + _fetch("small_blocks", FILE_NAME, "")
    + _fetch("large_blocks", FILE_NAME, f"-b {LARGE_BLOCK}")
    + _fetch("escape", ESCAPE_NAME, "")
    # busybox prints the server's error message; keep it on one RESULT line.
    + "echo RESULT escape_error=$(tr '\\n' ' ' < /tmp/escape.err)\n"
)


def _rate(results: dict[str, str], name: str) -> str:
    centis = int(results[f"{name}_centis"])
    if centis <= 0:
        return "n/a (under 10 ms)"
    return f"{FILE_SIZE * 100 / centis / 1e6:.2f} MB/s ({centis / 100:.2f} s)"


def test_tftp_fetch_and_refusal(vhostnet, run_guest, qemu_version, tmp_path):
    root = tmp_path / "tftp"
    root.mkdir()
    payload = random.Random(20240601).randbytes(FILE_SIZE)
    (root / FILE_NAME).write_bytes(payload)
    expected_sha = hashlib.sha256(payload).hexdigest()
    control_path = tmp_path / "control.sock"

    server = vhostnet("--tftp", str(root), "--control", str(control_path))
    run = run_guest(qemu_version, GUEST_SCRIPT, socket_path=server.socket_path, timeout=300)
    run.check_completed()
    results = run.results
    assert results["link"] == "up", "virtio_net did not create eth0"

    for name in ("small_blocks", "large_blocks"):
        assert results[f"{name}_rc"] == "0", f"{name}: tftp failed\n{run.output}"
        assert results[f"{name}_sha256"] == expected_sha, f"{name}: content differs"
    print(f"QEMU {qemu_version} TFTP 5 MiB: blksize 512: {_rate(results, 'small_blocks')}; "
          f"blksize {LARGE_BLOCK}: {_rate(results, 'large_blocks')}")

    assert results["escape_rc"] != "0", "the '..' request must fail in the guest"
    assert results["escape_sha256"] == "none", "no file may arrive for a '..' request"
    assert "access violation" in results["escape_error"], results["escape_error"]

    reply = control_request(str(control_path), "stats")
    assert reply["ok"], reply
    counters = reply["counters"]
    assert counters.get("tftp.refused.access_violation") == 1, counters
    assert counters.get("tftp.transfers_started") == 2, counters
    assert counters.get("tftp.transfers_completed") == 2, counters
    assert counters.get("tftp.bytes_sent", 0) >= 2 * FILE_SIZE, counters
    assert counters.get("tftp.transfers_active") == 0, counters
    print(f"QEMU {qemu_version} TFTP counters: "
          + ", ".join(f"{k}={v}" for k, v in sorted(counters.items()) if k.startswith("tftp.")))
    assert server.running()
