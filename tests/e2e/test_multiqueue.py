"""A multiqueue guest (QEMU ``queues=2``, ``mq=on``, two vCPUs): ping and a 20 MiB download.

Linux enables one queue pair per online CPU and picks the TX queue by the sending
CPU (XPS), so the ping runs pinned to CPU 0 and the download to CPU 1: each must
pass, and vhostnet's ring counters must show frames both ways on both pairs
(vq0/vq1: pair 0, vq2/vq3: pair 1), the answers steered back to the pair their
flow was sent on, the download's written straight into pair 1's RX ring (direct RX).
"""

from __future__ import annotations

import pytest

from tests.e2e.guestlib import GATEWAY, ping_check, static_ipv4
from tests.e2e.hostservers import HttpFileServer, generated_bytes, sha256_hex
from vhostnet.control import control_request

pytestmark = pytest.mark.e2e

DOWNLOAD_BYTES = 20 * 1024 * 1024
DOWNLOAD_SEED = 20260514
PINGS = 3
PAIRS = 2


def guest_script(http_port: int) -> str:
    return static_ipv4() + """
echo "RESULT cpus=$(nproc)"
echo "RESULT rx_queues=$(ls -d /sys/class/net/eth0/queues/rx-* | wc -l)"
echo "RESULT tx_queues=$(ls -d /sys/class/net/eth0/queues/tx-* | wc -l)"
""" + ping_check(GATEWAY, count=PINGS).replace("ping ", "taskset 1 ping ", 1) + f"""
timeout 400 taskset 2 wget -q -O - http://{GATEWAY}:{http_port}/big.bin | sha256sum > /tmp/sum
echo "RESULT download_sha256=$(cut -d' ' -f1 /tmp/sum)"
"""


def test_two_queue_pairs_ping_and_download(vhostnet, run_guest, kit, e2e_tmp):
    if kit.qemu10 is None:
        pytest.skip(f"QEMU 10.0 unavailable: {kit.qemu10_reason}")
    data = generated_bytes(DOWNLOAD_BYTES, DOWNLOAD_SEED)
    control = str(e2e_tmp / "control.sock")
    with HttpFileServer("big.bin", data) as http:
        server = vhostnet("--queues", str(PAIRS), "--control", control)
        run = run_guest("10.0", guest_script(http.port), socket_path=server.socket_path,
                        timeout=900, queues=PAIRS)
    run.check_completed()
    results = run.results
    assert results["link"] == "up", "virtio_net did not create eth0"
    assert results["cpus"] == str(PAIRS)
    assert results["rx_queues"] == str(PAIRS) and results["tx_queues"] == str(PAIRS), results
    assert results["ping"] == "ok" and results["ping_loss"] == "0", run.output[-3000:]
    assert results["download_sha256"] == sha256_hex(data), run.output[-3000:]
    counters = control_request(control, "stats")["counters"]
    for ring in range(2 * PAIRS):
        direction = "rx" if ring % 2 == 0 else "tx"
        assert counters.get(f"vq{ring}.{direction}_frames", 0) > 0, (ring, counters)
    # The download went out on pair 1 and came back there: most of RX is on ring 2.
    assert counters["vq2.rx_frames"] > counters["vq0.rx_frames"], counters
    # The download went straight from the host socket into pair 1's RX ring (direct RX).
    assert counters.get("tcp.direct_rx_segments", 0) > 0, counters
    print({name: value for name, value in counters.items()
           if name.startswith("vq") and name.endswith(("_frames", "_bytes"))})
    assert server.running(), "vhostnet should still be serving after the guest left"
