"""Stream mode with real guests: QEMU's ``-netdev stream`` (libvirt 9.0 to 11.0 starting passt)
on vhostnet's one socket, with virtio-net and with e1000, under QEMU 7.2 and 10.0.

Each boot: DHCP, ping the gateway, a 20 MiB download from a host HTTP server checked
with sha256, with ``--pcap`` on. The capture is then read back: every frame vhostnet
counted both ways is in it, the guest's pings and vhostnet's replies among them, and
``tshark -r`` reads it without an error (skipped, with the reason, without tshark).
"""

from __future__ import annotations

import pytest

from tests.e2e.guestlib import GATEWAY, GUEST_ADDRESS, ping_check
from tests.e2e.hostservers import HttpFileServer, generated_bytes, sha256_hex
from tests.support.pcap import read_pcap, tshark_frames
from vhostnet.control import control_request

pytestmark = pytest.mark.e2e

DOWNLOAD_BYTES = 20 * 1024 * 1024
DOWNLOAD_SEED = 20250713
PINGS = 3


def guest_script(http_port: int) -> str:
    return """
if ip link show eth0 >/dev/null 2>&1; then echo RESULT link=up; else echo RESULT link=missing; fi
echo "RESULT driver=$(readlink /sys/class/net/eth0/device/driver | sed "s,.*/,,")"
ip link set eth0 up
timeout 60 udhcpc -i eth0 -n -q -t 10 -T 2
echo "RESULT dhcp_ip=$(ip -4 -o addr show eth0 | sed -n 's/.* inet \\([0-9.]*\\)\\/.*/\\1/p')"
echo "RESULT route=$(ip route show default | cut -d' ' -f3)"
""" + ping_check(GATEWAY, count=PINGS, name="ping_gateway") + f"""
timeout 400 wget -q -O - http://{GATEWAY}:{http_port}/big.bin | sha256sum > /tmp/sum
echo "RESULT download_sha256=$(cut -d' ' -f1 /tmp/sum)"
"""


# e1000 takes an interrupt per frame under TCG: the slow one of the two.
@pytest.mark.parametrize("nic", ["virtio-net-pci", pytest.param("e1000", marks=pytest.mark.slow)])
def test_stream_dhcp_ping_download_and_capture(vhostnet, run_guest, qemu_version, nic, e2e_tmp):
    data = generated_bytes(DOWNLOAD_BYTES, DOWNLOAD_SEED)
    control = str(e2e_tmp / "control.sock")
    capture = e2e_tmp / "guest.pcap"
    with HttpFileServer("big.bin", data) as http:
        server = vhostnet("--control", control, "--pcap", str(capture),
                          # Room for every frame even when a loaded machine makes the
                          # download retransmit a lot (126k frames seen on 7.2 with e1000).
                          "--pcap-size", str(512 * 1024 * 1024))
        run = run_guest(qemu_version, guest_script(http.port), socket_path=server.socket_path,
                        timeout=900, stream=True, nic_model=nic)
        stats = control_request(control, "stats")["counters"]
    assert server.stop() in (0, -15)  # the capture file is complete once vhostnet ends
    run.check_completed()
    results = run.results
    expected_driver = "e1000" if nic == "e1000" else "virtio_net"
    assert results.get("driver") == expected_driver, run.output[-3000:]
    assert results.get("dhcp_ip") == GUEST_ADDRESS, run.output[-3000:]
    assert results.get("route") == GATEWAY
    assert results["ping_gateway"] == "ok" and results["ping_gateway_loss"] == "0"
    assert results["download_sha256"] == sha256_hex(data), run.output[-3000:]
    assert "stream front-end (-netdev stream)" in server.log_text()
    assert stats["stream.protocol_errors"] == 0

    records = read_pcap(capture)
    assert stats["capture.dropped"] == 0
    assert len(records) == stats["stream.tx.frames"] + stats["stream.rx.frames"], stats
    frames = [frame for _, frame in records]
    echo_requests = [f for f in frames if f[12:14] == b"\x08\x00" and f[23] == 1 and f[34] == 8]
    echo_replies = [f for f in frames if f[12:14] == b"\x08\x00" and f[23] == 1 and f[34] == 0]
    assert len(echo_requests) == len(echo_replies) == PINGS
    assert all(reply[42:] == request[42:] for request, reply in zip(echo_requests, echo_replies,
                                                                       strict=True))
    lines = tshark_frames(capture)
    assert len(lines) == len(records)
    assert sum("DHCP ACK" in line for line in lines) >= 1
    print(f"\nQEMU {qemu_version} {nic}: {len(records)} frames captured, "
          f"{capture.stat().st_size / 1e6:.1f} MB")
