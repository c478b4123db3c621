"""UDP and DNS over IPv6 with a real guest (SLAAC from our RA, static IPv4 beside it) at
MTU 1500, in one boot (QEMU 7.2 and 10.0):

  1. a UDP echo over IPv6: the guest's client to a host echo server on ::1 through the
     mapped gateway address fec0::2, a small datagram and a 4000-byte one (fragments each
     way: the guest's kernel fragments, vhostnet reassembles; vhostnet fragments the echo,
     the guest reassembles);
  2. dual stack at once: IPv4 and IPv6 echoes of 4000 bytes in parallel, to 127.0.0.1 and ::1;
  3. a forward without a bind address (``-u HOST:GUEST``) takes a host peer on ::1 and one
     on 127.0.0.1, 4000 bytes each, answered by the guest with 4005 bytes;
  4. ``nslookup -type=aaaa`` through the IPv6 DNS address fec0::3 against a stub upstream
     on ::1 (and an A query through 10.0.2.3 to the same upstream);
  5. ``ping -s 3000`` the gateway over both families (vhostnet answers, reassembling the
     request and fragmenting the reply).
The guest kernel's own counters (Ip6ReasmOKs, Ip6FragOKs, ReasmOKs) must show that the
datagrams really travelled in fragments, and vhostnet's that none was dropped.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.e2e.guestlib import GATEWAY, compile_guest_tool, guest_binary, ping_check, static_ipv4
from tests.e2e.hostservers import DnsServer, free_port
from tests.e2e.test_fragments import UdpEcho, forward_exchange, guest_ip_counters
from tests.e2e.test_ipv6 import WAIT_FOR_SLAAC
from vhostnet.control import control_request

pytestmark = pytest.mark.e2e

GATEWAY6 = "fec0::2"
DNS6 = "fec0::3"
DNS4 = "10.0.2.3"
DATAGRAM_BYTES = 4000
SMALL_BYTES = 100
PING_BYTES = 3000
GUEST_UDP = 5003
TEST_NAME = "dual.vhostnet.test"
TEST_NAME_ADDRESS6 = "2001:db8:5::53"
TEST_NAME_ADDRESS = "192.0.2.53"


def guest_script(udpecho: bytes, echo6_port: int, echo4_port: int) -> str:
    return static_ipv4() + WAIT_FOR_SLAAC + guest_binary("/tmp/udpecho", udpecho) + f"""
echo "RESULT mtu=$(cat /sys/class/net/eth0/mtu)"
/tmp/udpecho {GUEST_UDP} 2 > /tmp/udp.out &
udp_pid=$!
/tmp/udpecho -c {GATEWAY6} {echo6_port} {SMALL_BYTES} > /tmp/small6.out
echo "RESULT small6_rc=$?"
/tmp/udpecho -c {GATEWAY6} {echo6_port} {DATAGRAM_BYTES} > /tmp/large6.out
echo "RESULT large6_rc=$?"
/tmp/udpecho -c {GATEWAY6} {echo6_port} {DATAGRAM_BYTES} > /tmp/dual6.out &
dual6_pid=$!
/tmp/udpecho -c {GATEWAY} {echo4_port} {DATAGRAM_BYTES} > /tmp/dual4.out &
dual4_pid=$!
wait $dual6_pid
echo "RESULT dual6_rc=$?"
wait $dual4_pid
echo "RESULT dual4_rc=$?"
for name in small6 large6 dual6 dual4; do echo "RESULT $name=$(cat /tmp/$name.out)"; done
nslookup -type=aaaa {TEST_NAME} {DNS6} > /tmp/aaaa.out 2>&1
cat /tmp/aaaa.out
echo "RESULT aaaa=$(grep -A3 'Name:.*{TEST_NAME}' /tmp/aaaa.out | sed -n 's/^Address:* *\\([0-9a-f:]*\\).*/\\1/p' | head -n1)"
nslookup -type=a {TEST_NAME} {DNS4} > /tmp/a.out 2>&1
echo "RESULT a=$(grep -A3 'Name:.*{TEST_NAME}' /tmp/a.out | sed -n 's/^Address:* *\\([0-9.]*\\).*/\\1/p' | head -n1)"
""" + ping_check(f"-6 {GATEWAY6}", 3, "ping6", f"-W 5 -s {PING_BYTES}") + ping_check(
        GATEWAY, 3, "ping4", f"-W 5 -s {PING_BYTES}") + """
echo UDP6-READY
wait $udp_pid
echo "RESULT server_rc=$?"
echo "RESULT ip_names=$(grep '^Ip:' /proc/net/snmp | head -n1 | cut -d' ' -f2- | tr ' ' ,)"
echo "RESULT ip_values=$(grep '^Ip:' /proc/net/snmp | tail -n1 | cut -d' ' -f2- | tr ' ' ,)"
awk '/^Ip6(ReasmOKs|ReasmFails|FragOKs|FragCreates) /{print "RESULT " $1 "=" $2}' /proc/net/snmp6
"""


@pytest.mark.parametrize("qemu_version", ["7.2", "10.0"], indirect=True)
def test_udp_dns_fragments_over_ipv6_and_dual_stack(vhostnet, guest, qemu_version, tmp_path,
                                                     e2e_tmp):
    udpecho = compile_guest_tool(Path(__file__).with_name("udpecho.c"),
                                 tmp_path)
    echo6, echo4 = UdpEcho("::1"), UdpEcho()
    dns = DnsServer({TEST_NAME: [TEST_NAME_ADDRESS, TEST_NAME_ADDRESS6]}, host="::1")
    host_udp = free_port(socket.SOCK_DGRAM)
    control = str(e2e_tmp / "control.sock")
    payload = (b"0123456789abcdef" * (DATAGRAM_BYTES // 16 + 1))[:DATAGRAM_BYTES]
    try:
        server = vhostnet("--control", control, "--mtu", "1500", "-u", f"{host_udp}:{GUEST_UDP}",
                          "--dns-upstream", f"[::1]:{dns.port}")
        machine = guest(qemu_version, guest_script(udpecho, echo6.port, echo4.port),
                        socket_path=server.socket_path)
        machine.wait_for("UDP6-READY", timeout=300)
        reply6 = forward_exchange(host_udp, payload, "::1")
        reply4 = forward_exchange(host_udp, payload)
        machine.wait_exit(timeout=120)
        stats = control_request(control, "stats")["counters"]
    finally:
        echo6.close()
        echo4.close()
        dns.close()
    results = machine.results()
    output = machine.output()

    assert results["mtu"] == "1500" and results["slaac"] == "ok", output[-3000:]
    # 1. and 2. echoes through the gateway, IPv6 alone, then both families at once.
    for name, size in (("small6", SMALL_BYTES), ("large6", DATAGRAM_BYTES),
                       ("dual6", DATAGRAM_BYTES), ("dual4", DATAGRAM_BYTES)):
        assert results[f"{name}_rc"] == "0", (name, output[-3000:])
        assert results[name] == f"udpecho client ok {size}", name
    assert sorted(echo6.sizes) == [SMALL_BYTES, DATAGRAM_BYTES, DATAGRAM_BYTES]
    assert echo4.sizes == [DATAGRAM_BYTES], "the host must get each datagram whole, once"
    # 3. one forward, both families, each answered by the guest.
    assert reply6 == b"pong " + payload
    assert reply4 == b"pong " + payload
    assert results["server_rc"] == "0"
    # 4. DNS through the IPv6 DNS address, upstream on ::1; the A query went there too.
    assert results["aaaa"] == TEST_NAME_ADDRESS6, output[-3000:]
    assert results["a"] == TEST_NAME_ADDRESS, output[-3000:]
    assert 28 in dns.query_types and TEST_NAME in dns.udp_queries
    # 5. large echoes to the gateway, both families.
    for name, target in (("ping6", GATEWAY6), ("ping4", GATEWAY)):
        assert results[name] == "ok" and results[f"{name}_loss"] == "0", output[-3000:]
        assert f"{PING_BYTES + 8} bytes from {target}" in output

    # Fragments, per family: the guest's 4000-byte datagrams (2 over IPv6, 1 over IPv4), its
    # 4005-byte answer to the forward and its 3 echo requests left in fragments; the echoes
    # of those datagrams, the host's 4000 bytes through the forward and the 3 echo replies
    # came to it in fragments (its kernel reassembled them).
    ip4 = guest_ip_counters(results)
    assert int(results["Ip6FragOKs"]) >= 2 + 1 + 3, results
    assert int(results["Ip6ReasmOKs"]) >= 2 + 1 + 3 and results["Ip6ReasmFails"] == "0", results
    assert ip4["FragOKs"] >= 1 + 1 + 3 and ip4["ReasmOKs"] >= 1 + 1 + 3, ip4
    assert ip4["ReasmFails"] == 0, ip4
    assert stats["frag.reassembled"] >= 6 + 5 and stats["frag.tx_datagrams"] >= 6 + 5, stats
    assert not {name: value for name, value in stats.items() if name.startswith("frag.drop.")}
    assert stats["udp6.rx"] >= 4 and stats["dns.answer"] >= 2, stats
    print(f"\nQEMU {qemu_version}: " + ", ".join(
        f"{name}={value}" for name, value in sorted(stats.items())
        if name.startswith(("frag.", "udp", "dns."))))
    assert server.running()
