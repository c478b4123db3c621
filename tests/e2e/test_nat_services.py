"""The NAT stack's services with a real guest: DHCP, DNS over UDP and TCP, bulk TCP, ICMP.

One boot per QEMU version checks, in order:
  1. udhcpc gets the address, router, DNS server, MTU (option 26) and lease time
     configured on the command line; a renew (SIGUSR1) is answered;
  2. nslookup resolves a name served by a DNS server the test runs on 127.0.0.1
     (UDP), and a length-prefixed query over TCP to 10.0.2.3:53 gets the answer;
  3. wget downloads 20 MB from an HTTP server on the host's loopback (via the
     gateway address) and a 20 MB upload with nc reaches a host sink; sha256
     matches both ways; the throughput is printed and kept as RESULT lines;
  4. a connection to a closed host port is refused at once;
  5. ping to the gateway (which is also the mapped host loopback) and to the DNS address.
"""

from __future__ import annotations

import pytest

from tests.e2e.guestlib import DNS_SERVER, GATEWAY, GUEST_ADDRESS, ping_check
from tests.e2e.hostservers import (
    DnsServer,
    HttpFileServer,
    TcpSink,
    dns_query,
    free_port,
    generated_bytes,
    sha256_hex,
)
from vhostnet.control import control_request

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MTU = 1400
LEASE_SECONDS = 7200  # --lease-time; the default is one day
TEST_NAME = "files.vhostnet.test"
TEST_NAME_ADDRESS = "10.20.30.40"
BULK_BYTES = 20 * 1024 * 1024
BULK_SEED = 20250101
GUEST_MEMORY_MB = 384  # two 20 MB files live in the initramfs' RAM

# udhcpc's hook: configure the link and print the lease as RESULT lines.
DHCP_HOOK = r"""#!/bin/sh
case "$1" in
    bound|renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        if [ -n "$mtu" ]; then ip link set "$interface" mtu "$mtu"; fi
        ip link set "$interface" up
        for gw in $router; do ip route replace default via "$gw" dev "$interface"; break; done
        : > /etc/resolv.conf
        for server in $dns; do echo "nameserver $server" >> /etc/resolv.conf; done
        echo "RESULT dhcp_${1}_ip=$ip"
        echo "RESULT dhcp_${1}_mask=$mask"
        echo "RESULT dhcp_${1}_router=$router"
        echo "RESULT dhcp_${1}_dns=$dns"
        echo "RESULT dhcp_${1}_mtu=$mtu"
        echo "RESULT dhcp_${1}_lease=$lease"
        echo "$1" >> /tmp/dhcp.events
        ;;
esac
exit 0
"""


def _octal_escaped(data: bytes) -> str:
    """``data`` as a printf format made only of \\ooo escapes (busybox printf knows them)."""
    return "".join(f"\\{byte:03o}" for byte in data)


def _uptime() -> str:
    return "$(cut -d' ' -f1 /proc/uptime)"


def guest_script(http_port: int, sink_port: int, closed_port: int) -> str:
    query = dns_query(TEST_NAME, query_id=0x4242)
    tcp_query = len(query).to_bytes(2, "big") + query
    return f"""
cat > /tmp/dhcp.sh <<'HOOK'
{DHCP_HOOK}HOOK
chmod +x /tmp/dhcp.sh
ip link set eth0 up
udhcpc -f -i eth0 -s /tmp/dhcp.sh -O mtu -t 10 -T 2 > /tmp/udhcpc.log 2>&1 &
dhcp_pid=$!
for i in $(seq 1 60); do [ -s /tmp/dhcp.events ] && break; sleep 0.5; done
kill -USR1 $dhcp_pid
for i in $(seq 1 40); do grep -q renew /tmp/dhcp.events 2>/dev/null && break; sleep 0.5; done
kill $dhcp_pid
cat /tmp/udhcpc.log
echo "RESULT dhcp_events=$(tr '\\n' , < /tmp/dhcp.events)"
echo "RESULT link_mtu=$(cat /sys/class/net/eth0/mtu)"

nslookup {TEST_NAME} > /tmp/nslookup.out 2>&1
cat /tmp/nslookup.out
echo "RESULT dns_udp=$(grep -A2 'Name:.*{TEST_NAME}' /tmp/nslookup.out | sed -n 's/^Address:* *\\([0-9.]*\\).*/\\1/p' | head -n1)"
printf '{_octal_escaped(tcp_query)}' | timeout 15 nc {DNS_SERVER} 53 > /tmp/dns_tcp.bin
echo "RESULT dns_tcp_hex=$(od -An -tx1 /tmp/dns_tcp.bin | tr -d ' \\n')"

t0={_uptime()}
timeout 300 wget -q -O /tmp/download http://{GATEWAY}:{http_port}/bulk.bin
echo "RESULT wget_rc=$?"
t1={_uptime()}
echo "RESULT download_seconds=$(echo "$t1 $t0 - p" | dc)"
echo "RESULT download_sha256=$(sha256sum /tmp/download | cut -d' ' -f1)"
rm -f /tmp/download

dd if=/dev/urandom of=/tmp/upload bs=1048576 count={BULK_BYTES // 1048576} 2>/dev/null
echo "RESULT upload_sha256=$(sha256sum /tmp/upload | cut -d' ' -f1)"
t0={_uptime()}
timeout 300 nc {GATEWAY} {sink_port} < /tmp/upload > /tmp/upload.reply
echo "RESULT upload_rc=$?"
t1={_uptime()}
echo "RESULT upload_seconds=$(echo "$t1 $t0 - p" | dc)"
echo "RESULT upload_reply=$(cat /tmp/upload.reply)"
rm -f /tmp/upload

t0={_uptime()}
timeout 30 nc {GATEWAY} {closed_port} < /dev/null > /tmp/refused.out 2>&1
echo "RESULT refused_rc=$?"
t1={_uptime()}
echo "RESULT refused_seconds=$(echo "$t1 $t0 - p" | dc)"
echo "RESULT refused_message=$(head -n1 /tmp/refused.out)"
""" + ping_check(GATEWAY, name="ping_gateway") + ping_check(DNS_SERVER, name="ping_dns")


def test_dhcp_dns_bulk_tcp_refused_ping(vhostnet, run_guest, qemu_version, e2e_tmp):
    download = generated_bytes(BULK_BYTES, BULK_SEED)
    control_path = e2e_tmp / "control.sock"
    closed_port = free_port()
    with (DnsServer({TEST_NAME: TEST_NAME_ADDRESS}) as dns,
          HttpFileServer("bulk.bin", download) as http,
          TcpSink() as sink):
        server = vhostnet("--mtu", str(MTU), "--dns-upstream", f"127.0.0.1:{dns.port}",
                          "--lease-time", str(LEASE_SECONDS), "--control", str(control_path))
        run = run_guest(qemu_version, guest_script(http.port, sink.port, closed_port),
                        socket_path=server.socket_path, timeout=600,
                        memory_mb=GUEST_MEMORY_MB)
        stats = control_request(str(control_path), "stats")["counters"]
    run.check_completed()
    results = run.results

    # 1. DHCP, first lease and renew
    for event in ("bound", "renew"):
        assert results.get(f"dhcp_{event}_ip") == GUEST_ADDRESS, (event, run.output[-3000:])
        assert results[f"dhcp_{event}_router"] == GATEWAY
        assert results[f"dhcp_{event}_dns"] == DNS_SERVER
        assert results[f"dhcp_{event}_mtu"] == str(MTU)
        assert results[f"dhcp_{event}_lease"] == str(LEASE_SECONDS)
    assert results["link_mtu"] == str(MTU)

    # 2. DNS through the forwarder, over UDP and TCP, answered by our server
    assert results["dns_udp"] == TEST_NAME_ADDRESS, run.output[-3000:]
    assert TEST_NAME in dns.udp_queries
    tcp_reply = bytes.fromhex(results["dns_tcp_hex"])
    assert len(tcp_reply) >= 2 and int.from_bytes(tcp_reply[:2], "big") == len(tcp_reply) - 2
    assert tcp_reply[2:4] == b"\x42\x42", "the TCP answer must carry the query's id"
    assert tcp_reply.endswith(bytes(int(x) for x in TEST_NAME_ADDRESS.split(".")))
    assert dns.tcp_queries == [TEST_NAME]

    # 3. bulk TCP both ways
    assert results["wget_rc"] == "0"
    assert results["download_sha256"] == sha256_hex(download)
    assert results["upload_rc"] == "0"
    assert [t.size for t in sink.transfers] == [BULK_BYTES]
    assert sink.transfers[0].sha256 == results["upload_sha256"]
    assert results["upload_reply"] == results["upload_sha256"]
    # In-order upload data of the established flow is written by the C fast path.
    assert stats.get("tcp.fast_segments", 0) > 0, stats
    assert stats.get("tcp.fast_bytes", 0) > 0
    # The guest's ACKs of the download are taken in C too (one engine update per batch).
    assert stats.get("tcp.fast_acks", 0) > 0, stats
    down_rate = BULK_BYTES / float(results["download_seconds"])
    up_rate = BULK_BYTES / float(results["upload_seconds"])
    print(f"\nQEMU {qemu_version}: guest download {down_rate / 1e6:.2f} MB/s "
          f"({results['download_seconds']} s), upload {up_rate / 1e6:.2f} MB/s "
          f"({results['upload_seconds']} s); host sink saw "
          f"{sink.transfers[0].bytes_per_second / 1e6:.2f} MB/s; fast path "
          f"{stats.get('tcp.fast_bytes', 0) / 1e6:.1f} MB in {stats.get('tcp.fast_segments', 0)} "
          f"segments, {stats.get('tcp.fast_acks', 0)} of {stats.get('tcp.segments_in', 0)} "
          f"guest segments were ACKs taken in C; left to Python: "
          f"{ {k: v for k, v in stats.items() if 'fast_fallback' in k} }")

    # 4. refused at once: the guest's SYN is answered with RST, no timeout
    assert results["refused_rc"] != "0"
    assert "refused" in results["refused_message"].lower(), results["refused_message"]
    assert float(results["refused_seconds"]) < 10.0, "refusal must not wait for a timeout"

    # 5. ICMP echo answered by vhostnet itself
    assert results["ping_gateway"] == "ok" and results["ping_gateway_loss"] == "0"
    assert results["ping_dns"] == "ok" and results["ping_dns_loss"] == "0"

    assert stats["tcp.connect_failed"] >= 1
    assert server.running()
