"""An IPv6 download and a half-closed IPv4 connection through a QEMU 10.0 live migration.

The guest gets its IPv6 address by SLAAC and downloads a paced file from an HTTP
server on the host's ::1 through the gateway fec0::2; at once it asks a second
server (IPv4, through 10.0.2.2) for a file with busybox nc, whose stdin ends after
the request, so nc shuts its write side down: that server answers only after it
saw the guest's FIN, so the whole answer travels over a half-closed connection.
Both servers are held part-way until the migration is over (both connections
certainly span it). Afterwards both files must arrive whole (sha256), and the
destination's counters must say both connections were restored, none reset.
"""

from __future__ import annotations

import re

import pytest

from tests.e2e.guestlib import GATEWAY, static_ipv4
from tests.e2e.held_connections import start_destination, start_migration, wait_until
from tests.e2e.hostservers import (
    LOOPBACK6,
    PacedHttpServer,
    generated_bytes,
    sha256_hex,
)
from tests.support.qmp import wait_migrated
from tools.guest_ipv6 import GATEWAY6, WAIT_FOR_SLAAC
from vhostnet.control import control_request

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DOWNLOAD6_BYTES = 30 * 1024 * 1024
DOWNLOAD6_SECONDS = 20.0
HALF_CLOSED_BYTES = 4 * 1024 * 1024
HALF_CLOSED_SECONDS = 15.0
HOLD_FRACTION = 0.6  # each server waits here until the migration is over
MIGRATE_AFTER_BYTES = (4 * 1024 * 1024, 1024 * 1024)  # the download's, the half-closed one's
GUEST_MEMORY_MB = 384
GUEST_DONE_SECONDS = 600.0


def guest_script(download6_port: int, half_closed_port: int) -> str:
    """SLAAC, the half-closed IPv4 fetch in the background, the IPv6 download; RESULT
    download6_sha256, half_closed_rc, half_closed_status, half_closed_sha256, done."""
    return static_ipv4() + WAIT_FOR_SLAAC + f"""
printf 'GET /tail HTTP/1.0\\r\\n\\r\\n' | timeout 900 nc {GATEWAY} {half_closed_port} > /tmp/tail &
tail_pid=$!
wget -q -O - 'http://[{GATEWAY6}]:{download6_port}/big' | sha256sum > /tmp/sum
echo "RESULT download6_sha256=$(cut -d' ' -f1 /tmp/sum)"
wait $tail_pid
echo "RESULT half_closed_rc=$?"
echo "RESULT half_closed_status=$(head -n 1 /tmp/tail | cut -d' ' -f2)"
echo "RESULT half_closed_sha256=$(tail -c {HALF_CLOSED_BYTES} /tmp/tail | sha256sum | cut -d' ' -f1)"
echo RESULT done=yes
"""


def test_ipv6_download_and_half_closed_ipv4_survive_qemu10_migration(vhostnet, guest, kit,
                                                                     tmp_path):
    if kit.qemu10 is None:
        pytest.fail(f"QEMU 10.0 is needed for DEVICE_STATE: {kit.qemu10_reason}")
    download = generated_bytes(DOWNLOAD6_BYTES, seed=606)
    answer = generated_bytes(HALF_CLOSED_BYTES, seed=404)
    controls = (tmp_path / "src.ctl", tmp_path / "dst.ctl")
    with (PacedHttpServer("big", download, DOWNLOAD6_SECONDS,
                          int(DOWNLOAD6_BYTES * HOLD_FRACTION), host=LOOPBACK6) as server6,
          PacedHttpServer("tail", answer, HALF_CLOSED_SECONDS,
                          int(HALF_CLOSED_BYTES * HOLD_FRACTION), half_closed=True) as server4):
        # Started as root, vhostnet keeps no capability unless told: direct TCP_REPAIR.
        source_net = vhostnet("--keep-cap-net-admin", "--control", str(controls[0]))
        dest_net = vhostnet("--keep-cap-net-admin", "--control", str(controls[1]), "--incoming")
        script = guest_script(server6.port, server4.port)
        source = guest("10.0", script, socket_path=source_net.socket_path,
                       qmp_path=tmp_path / "src.qmp", memory_mb=GUEST_MEMORY_MB)
        destination = start_destination(guest, "10.0", script, dest_net.socket_path, tmp_path,
                                        GUEST_MEMORY_MB)
        wait_until(server4.client_closed.is_set, 300, "the guest to half-close its connection")
        wait_until(lambda: server6.sent >= MIGRATE_AFTER_BYTES[0]
                   and server4.sent >= MIGRATE_AFTER_BYTES[1], 300,
                   "both transfers to be under way")
        start_migration(source, destination, tmp_path)
        wait_migrated(source)
        info = source.qmp("query-migrate")
        print(f"migration total {info.get('total-time')} ms, downtime {info.get('downtime')} ms")
        assert server6.sent < DOWNLOAD6_BYTES and server4.sent < HALF_CLOSED_BYTES, \
            "a transfer ended before the migration"
        server6.release()
        server4.release()
        destination.wait_exit(GUEST_DONE_SECONDS)
        results = destination.results()
        counters = control_request(str(controls[1]), "stats")["counters"]
    print("destination TCP counters:", {k: v for k, v in counters.items() if k.startswith("tcp.")})
    assert results.get("done") == "yes", destination.output()[-3000:]
    assert source.results().get("slaac") == "ok", source.output()[-3000:]  # before the switch
    assert results.get("download6_sha256") == sha256_hex(download), "IPv6 download corrupted"
    assert results.get("half_closed_rc") == "0", results
    assert results.get("half_closed_status") == "200", results
    assert results.get("half_closed_sha256") == sha256_hex(answer), \
        "the answer over the half-closed connection was cut or corrupted"
    assert server6.requests == 1 and server4.requests == 1, "a transfer did not stay on one connection"
    assert counters.get("tcp.migration_restored") == 2, counters
    assert counters.get("tcp.migration_reset", 0) == 0, counters
    assert re.search(r"released 2 frozen TCP connection\(s\)", source_net.log_text())
