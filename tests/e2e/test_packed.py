"""A guest on packed virtqueues (QEMU ``packed=on``): ping the gateway and a 20 MiB download.

The guest's virtio device must show VIRTIO_F_RING_PACKED negotiated (bit 34 of its
feature string) and vhostnet must have started both rings packed; the download's
sha256 must match what the host served, and the download's data must have been peeked
straight into the guest's packed RX buffers (``tcp.direct_rx_segments``).
"""

from __future__ import annotations

import pytest

from tests.e2e.guestlib import GATEWAY, ping_check, static_ipv4
from tests.e2e.hostservers import HttpFileServer, generated_bytes, sha256_hex
from vhostnet.control import control_request

pytestmark = pytest.mark.e2e

DOWNLOAD_BYTES = 20 * 1024 * 1024
DOWNLOAD_SEED = 20260034
PINGS = 3
RING_PACKED_BIT = 34


def guest_script(http_port: int) -> str:
    return static_ipv4() + f"""
echo "RESULT ring_packed=$(cut -c{RING_PACKED_BIT + 1} /sys/class/net/eth0/device/features)"
""" + ping_check(GATEWAY, count=PINGS) + f"""
timeout 400 wget -q -O - http://{GATEWAY}:{http_port}/big.bin | sha256sum > /tmp/sum
echo "RESULT download_sha256=$(cut -d' ' -f1 /tmp/sum)"
"""


def test_packed_ring_ping_and_download(vhostnet, run_guest, qemu_version, e2e_tmp):
    data = generated_bytes(DOWNLOAD_BYTES, DOWNLOAD_SEED)
    control = str(e2e_tmp / "control.sock")
    with HttpFileServer("big.bin", data) as http:
        server = vhostnet("--control", control)
        run = run_guest(qemu_version, guest_script(http.port), socket_path=server.socket_path,
                        timeout=900, packed=True)
    run.check_completed()
    results = run.results
    assert results["link"] == "up", "virtio_net did not create eth0"
    assert results.get("ring_packed") == "1", "the guest did not negotiate packed rings"
    assert "ring 0 started (packed" in server.log_text(), server.log_text()[-3000:]
    assert "ring 1 started (packed" in server.log_text()
    assert results["ping"] == "ok" and results["ping_loss"] == "0", run.output[-3000:]
    assert results["download_sha256"] == sha256_hex(data), run.output[-3000:]
    counters = control_request(control, "stats")["counters"]
    assert counters.get("tcp.direct_rx_segments", 0) > 0, counters
    assert server.running(), "vhostnet should still be serving after the guest left"
