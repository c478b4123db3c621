"""Leases and names with one real guest: ``--dhcp-host`` gives the guest its reserved
address, the name it sends (DHCP option 12) resolves under vhostnet.internal, the host
as host.vhostnet.internal, unknown names of the domain get NXDOMAIN, other names go
upstream; a forwarded port reaches the guest at its reserved address (the network's
guest address follows the lease)."""

from __future__ import annotations

import socket

import pytest

from tests.e2e.hostservers import DnsServer, free_port
from tests.e2e.test_nat_services import DHCP_HOOK
from tools.qemu import DEFAULT_MAC

pytestmark = pytest.mark.e2e

RESERVED = "10.0.2.77"
UPSTREAM_NAME = "files.vhostnet.test"
UPSTREAM_ADDRESS = "10.20.30.40"
GUEST_PORT = 7070


def _lookup(name: str, result: str) -> str:
    return f"""
nslookup {name} > /tmp/ns.out 2>&1
echo "RESULT {result}_rc=$?"
cat /tmp/ns.out
echo "RESULT {result}=$(grep -A2 'Name:.*{name}' /tmp/ns.out | sed -n 's/^Address:* *\\([0-9.]*\\).*/\\1/p' | head -n1)"
"""


def guest_script() -> str:
    return f"""
cat > /tmp/dhcp.sh <<'HOOK'
{DHCP_HOOK}HOOK
chmod +x /tmp/dhcp.sh
ip link set eth0 up
udhcpc -q -n -i eth0 -s /tmp/dhcp.sh -x hostname:Alpha_Box -t 10 -T 2 > /tmp/udhcpc.log 2>&1
cat /tmp/udhcpc.log
""" + _lookup("alpha-box.vhostnet.internal", "by_name") + _lookup(
        "host.vhostnet.internal", "host") + _lookup(UPSTREAM_NAME, "upstream") + f"""
nslookup nobody.vhostnet.internal > /tmp/nx.out 2>&1
echo "RESULT nobody_rc=$?"
cat /tmp/nx.out
echo "RESULT nobody_nx=$(grep -ci nxdomain /tmp/nx.out)"
echo hello-from-the-guest > /tmp/hello
timeout 120 nc -l -p {GUEST_PORT} < /tmp/hello &
sleep 1
echo LEASES-READY
wait
"""


def test_reservation_names_and_forward(vhostnet, guest, qemu_version):
    host_port = free_port()
    with DnsServer({UPSTREAM_NAME: UPSTREAM_ADDRESS}) as dns:
        server = vhostnet("--dhcp-host", f"{DEFAULT_MAC},{RESERVED}", "--dns-upstream",
                          f"127.0.0.1:{dns.port}", "-t", f"{host_port}:{GUEST_PORT}")
        machine = guest(qemu_version, guest_script(), socket_path=server.socket_path)
        machine.wait_for("LEASES-READY", timeout=300)
        with socket.create_connection(("127.0.0.1", host_port), timeout=30) as sock:
            sock.settimeout(30)
            greeting = sock.recv(100)
        machine.wait_exit(timeout=120)
    results, output = machine.results(), machine.output()
    assert results.get("dhcp_bound_ip") == RESERVED, output[-3000:]
    assert results["by_name"] == RESERVED, output[-3000:]
    assert results["host"] == "10.0.2.2"
    assert results["upstream"] == UPSTREAM_ADDRESS
    assert dns.udp_queries and all("vhostnet.internal" not in q for q in dns.udp_queries)
    assert results["nobody_rc"] != "0" and results["nobody_nx"] != "0", output[-2000:]
    assert greeting == b"hello-from-the-guest\n"
    assert server.running()
