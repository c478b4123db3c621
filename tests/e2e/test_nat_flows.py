"""200 concurrent guest TCP connections through the NAT, then nothing left behind.

The host server holds every connection until all 200 are open at once (so they
really are concurrent), reads vhostnet's flow gauge at that moment, then echoes
each connection's line. Afterwards the flow table must be empty and vhostnet
must hold exactly the file descriptors it held before the connections.
"""

from __future__ import annotations

import os
import socket
import time

import pytest

from tests.e2e.guestlib import GATEWAY, static_ipv4
from tests.e2e.hostservers import LOOPBACK, BarrierEchoServer, free_port
from vhostnet.control import control_request

pytestmark = pytest.mark.e2e

CONNECTIONS = 200
SETTLE_LIMIT = 20.0  # seconds to wait for the last flows to close (FIN exchange, timers)
GUEST_LINGER = 60  # at most this long the guest waits for the host's "done" after its check
RELEASE_PORT = 7000  # the host connects here (forwarded) once it has counted, and the guest ends


def guest_script(port: int) -> str:
    return static_ipv4() + f"""
mkdir /tmp/flows
echo FLOWS-START
sleep 1
for i in $(seq 1 {CONNECTIONS}); do
    (printf 'flow-%d\\n' $i | timeout 150 nc {GATEWAY} {port} > /tmp/flows/$i 2>&1) &
done
wait
ok=0
for i in $(seq 1 {CONNECTIONS}); do
    [ "$(cat /tmp/flows/$i)" = "echo flow-$i" ] && ok=$((ok + 1))
done
echo "RESULT flows_ok=$ok"
head -n3 /tmp/flows/1 /tmp/flows/{CONNECTIONS}
echo FLOWS-DONE
timeout {GUEST_LINGER} nc -l -p {RELEASE_PORT} > /dev/null
"""


def open_fds(pid: int) -> set[str]:
    """What each of the process's descriptors points at (sockets by inode)."""
    base = f"/proc/{pid}/fd"
    found = set()
    for name in os.listdir(base):
        try:
            found.add(f"{name}->{os.readlink(os.path.join(base, name))}")
        except FileNotFoundError:
            pass  # closed while we looked
    return found


def stats(path: str) -> dict[str, int]:
    return control_request(path, "stats")["counters"]


def test_200_concurrent_connections_leave_nothing_behind(vhostnet, guest, qemu_version,
                                                         e2e_tmp):
    control = str(e2e_tmp / "control.sock")
    release_port = free_port()
    server = vhostnet("--control", control, "-t", f"{release_port}:{RELEASE_PORT}")
    seen_at_peak: dict[str, int] = {}

    def record_peak() -> None:
        seen_at_peak.update(stats(control))

    with BarrierEchoServer(CONNECTIONS, wait_limit=120, on_all_open=record_peak) as echo:
        machine = guest(qemu_version, guest_script(echo.port), socket_path=server.socket_path)
        machine.wait_for("FLOWS-START", timeout=300)
        fds_before = open_fds(server.pid)
        machine.wait_for("FLOWS-DONE", timeout=300)
        deadline = time.monotonic() + SETTLE_LIMIT
        while stats(control)["tcp.flows_open"] and time.monotonic() < deadline:
            time.sleep(0.2)
        final = stats(control)
        # The control connection just used closes on vhostnet's side a moment later.
        fds_after = open_fds(server.pid)
        while fds_after != fds_before and time.monotonic() < deadline + 5:
            time.sleep(0.2)
            fds_after = open_fds(server.pid)
        with socket.create_connection((LOOPBACK, release_port), timeout=10):
            pass
        machine.wait_exit(timeout=GUEST_LINGER + 60)
        peak = echo.peak
        lines = sorted(echo.lines)

    results = machine.results()
    assert results.get("flows_ok") == str(CONNECTIONS), machine.output()[-3000:]
    assert peak == CONNECTIONS, "the connections were not all open at once"
    assert lines == sorted(f"flow-{i}\n".encode() for i in range(1, CONNECTIONS + 1))
    assert seen_at_peak["tcp.flows_open"] >= CONNECTIONS
    assert final["tcp.flows_open"] == 0, final
    assert final["tcp.flows_total"] >= CONNECTIONS
    assert final.get("tcp.rst_sent", 0) == 0, "every flow should end with FINs, not resets"
    assert fds_after == fds_before, (f"leaked: {sorted(fds_after - fds_before)}, "
                                     f"closed: {sorted(fds_before - fds_after)}")
    print(f"\nQEMU {qemu_version}: {CONNECTIONS} concurrent flows, vhostnet fds "
          f"{len(fds_before)} before and {len(fds_after)} after")
    assert server.running()
