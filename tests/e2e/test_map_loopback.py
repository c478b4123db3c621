"""`--map-host-loopback ADDR` with a real guest: ADDR, not the gateway, reaches the host.

passt's meaning: traffic from the guest to ADDR goes to the host's 127.0.0.1,
and a host peer on loopback appears to the guest as ADDR. The gateway address
is then virtual only: a connection to it is refused.
"""

from __future__ import annotations

import pytest

from tests.e2e.guestlib import GATEWAY, ping_check, static_ipv4
from tests.e2e.hostservers import HttpFileServer, generated_bytes, sha256_hex
from vhostnet.control import control_request

pytestmark = pytest.mark.e2e

MAPPED = "10.0.2.100"  # on the guest's subnet, so the guest ARPs for it directly
FILE_BYTES = 2 * 1024 * 1024


def guest_script(http_port: int) -> str:
    return static_ipv4() + ping_check(MAPPED, count=2) + f"""
timeout 60 wget -q -O /tmp/download http://{MAPPED}:{http_port}/file.bin
echo "RESULT wget_rc=$?"
echo "RESULT download_sha256=$(sha256sum /tmp/download | cut -d' ' -f1)"
timeout 30 nc {GATEWAY} {http_port} < /dev/null > /tmp/refused.out 2>&1
echo "RESULT gateway_rc=$?"
echo "RESULT gateway_message=$(head -n1 /tmp/refused.out)"
"""


def test_mapped_address_reaches_host_loopback(vhostnet, run_guest, qemu_version, e2e_tmp):
    data = generated_bytes(FILE_BYTES, seed=100)
    http = HttpFileServer("file.bin", data)
    try:
        server = vhostnet("--map-host-loopback", MAPPED, "--control", str(e2e_tmp / "control"))
        run = run_guest(qemu_version, guest_script(http.port), socket_path=server.socket_path)
        counters = control_request(str(e2e_tmp / "control"), "stats")["counters"]
    finally:
        http.close()
    run.check_completed()
    results = run.results
    assert results["ping"] == "ok", run.output
    assert results["wget_rc"] == "0", run.output
    assert results["download_sha256"] == sha256_hex(data)
    # The gateway leads nowhere now: refused at once rather than reaching the host.
    assert results["gateway_rc"] != "0"
    assert "refused" in results["gateway_message"].lower(), results["gateway_message"]
    assert counters["icmp.echo.local"] >= 2
