"""IP fragments with a real guest at MTU 1500: its kernel fragments what it sends, and must
reassemble what vhostnet fragments for it.

One boot (on QEMU 7.2 and 10.0) checks:
  1. a 4000-byte UDP datagram from the guest to a host UDP echo server (through the
     gateway address, i.e. the host's loopback) and its 4000-byte echo back;
  2. a 4000-byte UDP datagram from a host peer to a port forwarded into the guest (-u),
     answered by the guest with 4005 bytes;
  3. ``ping -s 3000`` to the gateway, answered by vhostnet itself (it reassembles the
     request and fragments the reply);
  4. ``ping -s 3000`` to a host address through a ping socket (the host kernel answers;
     the namespace's loopback gets that address for the test).
vhostnet's counters must show the reassembly and the fragmentation, and no fragment dropped.
"""

from __future__ import annotations

import base64
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.guestlib import GATEWAY, ping_check, static_ipv4
from tests.e2e.hostservers import LOOPBACK, free_port
from tests.e2e.test_nat_forwards import build_udpecho
from vhostnet.control import control_request

pytestmark = pytest.mark.e2e

DATAGRAM_BYTES = 4000
PING_BYTES = 3000
GUEST_UDP = 5003
HOST_ADDRESS = "10.9.9.9"  # on the namespace's loopback for this test: reached by ping socket
ECHO_LIMIT = 8  # datagrams the host echo server answers at most
SOCKET_TIMEOUT = 20.0


class UdpEcho:
    """Answers each datagram on ``host`` (127.0.0.1 or ::1) with the same bytes (at most
    ECHO_LIMIT)."""

    def __init__(self, host: str = LOOPBACK) -> None:
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                                  socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(1.0)
        self.port = self.sock.getsockname()[1]
        self.sizes: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set() and len(self.sizes) < ECHO_LIMIT:
            try:
                data, peer = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            self.sizes.append(len(data))
            self.sock.sendto(data, peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=10)


@pytest.fixture
def host_address() -> Iterator[str]:
    """HOST_ADDRESS on the private namespace's loopback, ping sockets allowed, for this test."""
    previous = Path("/proc/sys/net/ipv4/ping_group_range").read_text().split()
    _run("ip", "addr", "add", f"{HOST_ADDRESS}/32", "dev", "lo")
    _run("sysctl", "-q", "-w", "net.ipv4.ping_group_range=0 2147483647")
    try:
        yield HOST_ADDRESS
    finally:
        _run("sysctl", "-q", "-w", f"net.ipv4.ping_group_range={previous[0]} {previous[1]}")
        _run("ip", "addr", "del", f"{HOST_ADDRESS}/32", "dev", "lo")


def guest_script(udpecho: bytes, echo_port: int, host_address: str) -> str:
    encoded = base64.encodebytes(udpecho).decode()
    return static_ipv4() + f"""
echo "RESULT mtu=$(cat /sys/class/net/eth0/mtu)"
base64 -d > /tmp/udpecho <<'B64'
{encoded}B64
chmod +x /tmp/udpecho
/tmp/udpecho {GUEST_UDP} 1 > /tmp/udp.out &
udp_pid=$!
/tmp/udpecho -c {GATEWAY} {echo_port} {DATAGRAM_BYTES} > /tmp/client.out
echo "RESULT client_rc=$?"
cat /tmp/client.out
""" + ping_check(GATEWAY, 3, "ping_gateway", f"-W 5 -s {PING_BYTES}") + ping_check(
        host_address, 3, "ping_host", f"-W 5 -s {PING_BYTES}") + """
echo FRAGMENTS-READY
wait $udp_pid
echo "RESULT server_rc=$?"
echo "RESULT ip_names=$(grep '^Ip:' /proc/net/snmp | head -n1 | cut -d' ' -f2- | tr ' ' ,)"
echo "RESULT ip_values=$(grep '^Ip:' /proc/net/snmp | tail -n1 | cut -d' ' -f2- | tr ' ' ,)"
"""


def guest_ip_counters(results: dict[str, str]) -> dict[str, int]:
    """The guest kernel's IP counters (/proc/net/snmp): ReasmOKs, FragCreates, ..."""
    names, values = results["ip_names"].split(","), results["ip_values"].split(",")
    return {name: int(value) for name, value in zip(names, values, strict=True)}


def forward_exchange(port: int, payload: bytes, host: str = LOOPBACK) -> bytes:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                       socket.SOCK_DGRAM) as sock:
        sock.settimeout(SOCKET_TIMEOUT)
        sock.sendto(payload, (host, port))
        return sock.recv(65535)


def test_large_datagrams_and_echoes_both_ways(vhostnet, guest, qemu_version, tmp_path,
                                              e2e_tmp, host_address):
    udpecho = build_udpecho(tmp_path)
    echo = UdpEcho()
    host_udp = free_port(socket.SOCK_DGRAM)
    control = str(e2e_tmp / "control.sock")
    try:
        server = vhostnet("--control", control, "--mtu", "1500", "-u", f"{host_udp}:{GUEST_UDP}")
        machine = guest(qemu_version, guest_script(udpecho, echo.port, host_address),
                        socket_path=server.socket_path)
        machine.wait_for("FRAGMENTS-READY", timeout=300)
        payload = (b"0123456789abcdef" * (DATAGRAM_BYTES // 16 + 1))[:DATAGRAM_BYTES]
        reply = forward_exchange(host_udp, payload)
        machine.wait_exit(timeout=120)
        stats = control_request(control, "stats")["counters"]
    finally:
        echo.close()
    results = machine.results()
    output = machine.output()

    assert results["mtu"] == "1500"
    # 1. guest -> host echo server -> guest, 4000 bytes each way.
    assert results["client_rc"] == "0", output[-3000:]
    assert f"udpecho client ok {DATAGRAM_BYTES}" in output
    assert echo.sizes == [DATAGRAM_BYTES], "the host must get the datagram whole, once"
    # 2. host peer -> forwarded port -> guest, and the guest's 4005-byte answer back.
    assert reply == b"pong " + payload
    assert results["server_rc"] == "0"
    # 3. and 4. large echoes, to the gateway (vhostnet answers) and to a host address.
    assert results["ping_gateway"] == "ok" and results["ping_gateway_loss"] == "0", output
    assert f"{PING_BYTES + 8} bytes from {GATEWAY}" in output
    assert results["ping_host"] == "ok" and results["ping_host_loss"] == "0", output
    assert f"{PING_BYTES + 8} bytes from {host_address}" in output
    assert stats["icmp.echo.local"] >= 3 and stats["icmp.echo.reply"] >= 3

    # The guest's 4000 + 4005-byte datagrams and 6 echo requests came in fragments ...
    guest_ip = guest_ip_counters(results)
    assert guest_ip["FragOKs"] >= 2 + 6 and stats["frag.reassembled"] >= 2 + 6, stats
    # ... and so did what vhostnet sent it: 2 datagrams (4000 bytes, 4000 bytes) + 6 echoes,
    # which the guest's kernel put together (a virtio-net guest would take frames past its
    # MTU whole too: its counters tell that they really were fragments).
    assert stats["frag.tx_datagrams"] >= 2 + 6, stats
    assert guest_ip["ReasmOKs"] >= 2 + 6 and guest_ip["ReasmFails"] == 0, guest_ip
    assert not {name: value for name, value in stats.items() if name.startswith("frag.drop.")}
    print(f"\nQEMU {qemu_version}: " + ", ".join(
        f"{name}={value}" for name, value in sorted(stats.items()) if name.startswith("frag."))
        + f"; guest ReasmOKs={guest_ip['ReasmOKs']} FragOKs={guest_ip['FragOKs']}")
    assert server.running()
