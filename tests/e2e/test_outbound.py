"""`-o/--outbound ADDR` with a real guest: its TCP and its DNS queries leave from ADDR.

The guest downloads from a host HTTP server through the gateway (the host's loopback)
and resolves a name through the DNS forwarder, whose upstream is a host DNS server. With
`-o 127.0.0.5` (every 127/8 address is the host's own) both servers see 127.0.0.5 as
the source; without it they would see 127.0.0.1.
"""

from __future__ import annotations

import pytest

from tests.e2e.guestlib import DNS_SERVER, GATEWAY, static_ipv4
from tests.e2e.hostservers import DnsServer, HttpFileServer, generated_bytes, sha256_hex

pytestmark = pytest.mark.e2e

OUTBOUND = "127.0.0.5"
TEST_NAME = "outbound.vhostnet.test"
FILE_BYTES = 256 * 1024


def guest_script(http_port: int) -> str:
    return static_ipv4() + f"""
echo "nameserver {DNS_SERVER}" > /etc/resolv.conf
nslookup {TEST_NAME} > /tmp/nslookup.out 2>&1
cat /tmp/nslookup.out
echo "RESULT resolved=$(grep -c 192.0.2.77 /tmp/nslookup.out)"
timeout 60 wget -q -O /tmp/download http://{GATEWAY}:{http_port}/file.bin
echo "RESULT wget_rc=$?"
echo "RESULT download_sha256=$(sha256sum /tmp/download | cut -d' ' -f1)"
"""


def test_guest_tcp_and_dns_leave_from_the_outbound_address(vhostnet, run_guest, qemu_version):
    data = generated_bytes(FILE_BYTES, seed=13)
    with (DnsServer({TEST_NAME: "192.0.2.77"}) as dns,
          HttpFileServer("file.bin", data) as http):
        server = vhostnet("-o", OUTBOUND, "--dns-upstream", f"127.0.0.1:{dns.port}")
        run = run_guest(qemu_version, guest_script(http.port), socket_path=server.socket_path)
        http_peers, dns_peers = list(http.peers), list(dns.udp_peers)
    run.check_completed()
    assert run.results["wget_rc"] == "0", run.output
    assert run.results["download_sha256"] == sha256_hex(data)
    assert run.results["resolved"] != "0", run.output
    assert http_peers and set(http_peers) == {OUTBOUND}, http_peers
    assert dns_peers and set(dns_peers) == {OUTBOUND}, dns_peers
