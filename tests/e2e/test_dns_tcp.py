"""DNS over TCP through vhostnet's DNS addresses, in a real guest on QEMU 7.2 and 10.0.

busybox nslookup only speaks UDP, so the guest runs ``dnstcp`` (tests/e2e/dnstcp.c): one
length-prefixed query over TCP to port 53 of an address. vhostnet's TCP engine connects
such a flow to an upstream resolver (``StackConfig.dns_tcp_upstream``: the first upstream
of the DNS address's family). Two stub upstreams, one on 127.0.0.1 and one on ::1, with
different records for the same name, show which one answered:
  1. AAAA over TCP through fec0::3 -> the stub on ::1;
  2. A over TCP through 10.0.2.3 -> the stub on 127.0.0.1;
  3. an unknown name over TCP through fec0::3 -> NXDOMAIN from the stub on ::1.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from tests.e2e.guestlib import DNS_SERVER, compile_guest_tool, guest_binary, static_ipv4
from tests.e2e.hostservers import LOOPBACK6, DnsServer
from tests.e2e.test_ipv6 import WAIT_FOR_SLAAC

pytestmark = pytest.mark.e2e

DNS6 = "fec0::3"
NAME = "tcp.vhostnet.test"
UNKNOWN = "missing.vhostnet.test"
UPSTREAM6_RECORDS = ["2001:db8:6::53", "2001:db8:6::54", "198.51.100.6"]
UPSTREAM4_RECORDS = ["192.0.2.44", "2001:db8:4::44"]


def guest_script(dnstcp: bytes) -> str:
    return static_ipv4() + WAIT_FOR_SLAAC + guest_binary("/tmp/dnstcp", dnstcp) + f"""
echo "RESULT aaaa6=$(/tmp/dnstcp {DNS6} {NAME} aaaa)"
echo "RESULT a4=$(/tmp/dnstcp {DNS_SERVER} {NAME} a)"
echo "RESULT unknown6=$(/tmp/dnstcp {DNS6} {UNKNOWN} aaaa)"
"""


def addresses(text: str) -> list[str]:
    """dnstcp's comma-separated answer, each address in its short form."""
    return [str(ipaddress.ip_address(part)) for part in text.split(",")]


def test_dns_over_tcp_through_both_dns_addresses(vhostnet, run_guest, qemu_version, tmp_path):
    dnstcp = compile_guest_tool(Path(__file__).with_name("dnstcp.c"), tmp_path)
    with (DnsServer({NAME: UPSTREAM6_RECORDS}, host=LOOPBACK6) as upstream6,
          DnsServer({NAME: UPSTREAM4_RECORDS}) as upstream4):
        # The IPv6 upstream first: the A query through 10.0.2.3 must still skip to the IPv4 one.
        server = vhostnet("--dns-upstream", f"[::1]:{upstream6.port}",
                          "--dns-upstream", f"127.0.0.1:{upstream4.port}")
        run = run_guest(qemu_version, guest_script(dnstcp), socket_path=server.socket_path)
    run.check_completed()
    results, output = run.results, run.output
    assert results["slaac"] == "ok", output[-3000:]
    # 1. and 2.: each answer holds exactly the records of that family from the stub of the
    # DNS address's family.
    assert addresses(results["aaaa6"]) == UPSTREAM6_RECORDS[:2], output[-3000:]
    assert addresses(results["a4"]) == UPSTREAM4_RECORDS[:1], output[-3000:]
    # 3. the refusal travels back too.
    assert results["unknown6"] == "error rcode 3", output[-3000:]
    assert upstream6.tcp_queries == [NAME, UNKNOWN] and not upstream6.udp_queries
    assert upstream4.tcp_queries == [NAME] and not upstream4.udp_queries
    assert upstream6.query_types == [28, 28] and upstream4.query_types == [1]
    assert server.running()
