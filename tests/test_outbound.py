"""passt's -o/--outbound, --outbound-if4/6, -i and --map-guest-addr (both families), honoured.

Each option is shown to change what happens: host servers see the source address of
guest traffic (TCP, UDP, DNS queries; ping sockets read their own name back), sockets read
their SO_BINDTODEVICE back (also after the drop to nobody), a connection bound to another
interface cannot reach an address of lo, and mapped addresses reach the host address
passt would pick. Command-line mistakes end in one sentence and exit 2.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.support.daemon import REPO, run_cli
from tests.support.dns import query
from tests.support.frames import DNS_IP, GATEWAY_IP, arp_request, guest_udp_frame
from tests.support.hostio import wait_for_frames
from tests.support.netns import extra_address, ping_sockets_allowed, veth_pair
from tests.support.tcp import GUEST_IP6
from tests.tcp.test_hostio_tcp import GATEWAY, GuestTcp, new_setup, run_until
from tests.test_cli_passt import parsed_config
from vhostnet.hostio.dns import DnsGlue
from vhostnet.hostio.icmp import open_ping_socket
from vhostnet.hostio.udp import UdpGlue
from vhostnet.network import build_stack
from vhostnet.outbound import open_outbound
from vhostnet.stack.config import StackConfig, ip4, ip6
from vhostnet.tcp.host import TcpHost

SECOND_LOOPBACK = "127.0.0.5"  # every 127/8 address is the host's own: no setup needed
MAPPED6 = ip6("fd00:9::9")  # the guest-side --map-guest-addr for IPv6


def _device(sock: socket.socket) -> bytes:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16).rstrip(b"\0")


# --- TCP -----------------------------------------------------------------------------


async def _peer_of_one_connection(config: StackConfig, remote: bytes, server_host: str,
                                  family: int = socket.AF_INET) -> tuple | None:
    """A guest connects to ``remote`` (port of a host server on ``server_host``); the peer
    address the server saw, or None when the guest's connection was reset."""
    loop = asyncio.get_running_loop()
    peers: list[tuple] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(writer.get_extra_info("peername"))
        writer.close()

    server = await asyncio.start_server(record, server_host, 0, family=family)
    port = server.sockets[0].getsockname()[1]
    _loop, net, engine = new_setup(config)
    host = TcpHost(engine, loop)
    try:
        guest = GuestTcp(net, 45000, remote, port)
        net.conns[45000] = guest
        guest.connect()
        await run_until(net, engine, host, lambda: guest.reset or bool(peers), timeout=10)
        return None if guest.reset else peers[0]
    finally:
        host.close()
        server.close()
        await server.wait_closed()
        _loop.close()


@pytest.mark.parametrize(("outbound", "seen"), [(None, "127.0.0.1"),
                                                (SECOND_LOOPBACK, SECOND_LOOPBACK)])
def test_a_guest_tcp_connection_comes_from_the_outbound_address(outbound, seen) -> None:
    config = StackConfig(outbound_ipv4=ip4(outbound) if outbound else None)
    peer = asyncio.run(_peer_of_one_connection(config, GATEWAY, "127.0.0.1"))
    assert peer is not None and peer[0] == seen


def test_outbound_if4_keeps_the_connection_on_that_interface() -> None:
    """Bound to a veth, the connect cannot reach an address that lives on lo (the
    kernel answers EHOSTUNREACH): the guest gets a reset; unbound, it connects."""
    with veth_pair("vhnout0", "10.77.0.1/24"), extra_address("10.78.0.1/32") as on_lo:
        free = asyncio.run(_peer_of_one_connection(StackConfig(), ip4(on_lo), on_lo))
        bound = asyncio.run(_peer_of_one_connection(StackConfig(outbound_if4="vhnout0"),
                                                    ip4(on_lo), on_lo))
    assert free is not None and free[0] == on_lo
    assert bound is None


def test_map_guest_addr6_reaches_the_guests_own_address_on_the_host() -> None:
    """As the IPv4 form: the guest's connection to the mapped address reaches, on the host,
    the guest's address (here configured with -a, which lo holds for the test)."""
    guest6 = socket.inet_ntop(socket.AF_INET6, GUEST_IP6)
    with extra_address(f"{guest6}/128") as own:
        for config in (StackConfig(guest_ipv6=GUEST_IP6, map_guest_addr6=MAPPED6),
                       StackConfig(map_guest_addr6=MAPPED6)):  # not configured: the source
            peer = asyncio.run(_peer_of_one_connection(config, MAPPED6, own, socket.AF_INET6))
            assert peer is not None
        unmapped = asyncio.run(_peer_of_one_connection(StackConfig(), MAPPED6, own,
                                                       socket.AF_INET6))
    assert unmapped is None  # nothing on the host answers fd00:9::9 itself


# --- UDP, DNS, ping ------------------------------------------------------------------


async def _udp_source(stack_config: StackConfig, dns: bool) -> str:
    """The source address a host UDP server on 127.0.0.1 sees for one guest datagram, sent
    to the gateway (a UDP flow) or to the DNS forwarder (an upstream query)."""
    loop = asyncio.get_running_loop()
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.setblocking(False)
    port = server.getsockname()[1]
    if dns:
        stack_config.dns_upstream = [("127.0.0.1", port)]
    stack = build_stack(stack_config)
    glue = DnsGlue(stack.dns, loop) if dns else UdpGlue(stack.udp_nat, loop)
    try:
        stack.receive_frame(arp_request(GATEWAY_IP), loop.time())
        frame = (guest_udp_frame(40000, DNS_IP, 53, query(0x4242)) if dns
                 else guest_udp_frame(4000, GATEWAY_IP, port, b"hello"))
        stack.receive_frame(frame, loop.time())
        glue.flush()
        _data, peer = await asyncio.wait_for(loop.sock_recvfrom(server, 512), 3.0)
        await wait_for_frames(stack, 0, timeout=0)
        return peer[0]
    finally:
        glue.close()
        server.close()


@pytest.mark.parametrize("dns", [False, True], ids=["udp-flow", "dns-upstream"])
def test_guest_udp_and_dns_queries_come_from_the_outbound_address(dns: bool) -> None:
    assert asyncio.run(_udp_source(StackConfig(), dns)) == "127.0.0.1"
    config = StackConfig(outbound_ipv4=ip4(SECOND_LOOPBACK))
    assert asyncio.run(_udp_source(config, dns)) == SECOND_LOOPBACK


def test_ping_sockets_are_bound_like_the_others() -> None:
    with veth_pair("vhnout1", "10.77.1.1/24"), ping_sockets_allowed():
        settings = SimpleNamespace(outbound_ipv4=ip4("10.77.1.1"), outbound_ipv6=None,
                                   outbound_if4="vhnout1", outbound_if6=None)
        with open_ping_socket(settings, "10.77.1.2") as sock:
            assert sock.getsockname()[0] == "10.77.1.1"
            assert _device(sock) == b"vhnout1"


# --- the binding itself, and after the drop to nobody -------------------------------


def test_bindtodevice_per_family_and_never_toward_loopback() -> None:
    with veth_pair("vhnout2", "10.77.2.1/24", "fd77:2::1/64"):
        settings = SimpleNamespace(outbound_ipv4=None, outbound_ipv6=ip6("fd77:2::1"),
                                   outbound_if4="vhnout2", outbound_if6="lo")
        with open_outbound(settings, "10.77.2.9", socket.SOCK_STREAM) as sock:
            assert _device(sock) == b"vhnout2" and sock.getsockname()[0] == "0.0.0.0"
        with open_outbound(settings, "fd77:2::9") as sock:
            assert _device(sock) == b"lo" and sock.getsockname()[0] == "fd77:2::1"
        with open_outbound(settings, "127.0.0.1", socket.SOCK_STREAM) as sock:
            assert _device(sock) == b""  # the host's loopback is behind no interface
    unbound = SimpleNamespace(outbound_ipv4=None, outbound_ipv6=None, outbound_if4=None,
                              outbound_if6=None)
    with open_outbound(unbound, "10.77.2.9") as sock:
        assert _device(sock) == b"" and sock.getsockname()[0] == "0.0.0.0"


AS_NOBODY = r"""
import json, socket, sys
from types import SimpleNamespace
from vhostnet import sandbox
from vhostnet.outbound import open_outbound

sandbox.harden_early()
sandbox.drop_privileges(sandbox.user_to_run_as(None))
sandbox.install_seccomp()
settings = SimpleNamespace(outbound_ipv4=None, outbound_ipv6=None,
                           outbound_if4=sys.argv[1], outbound_if6=None)
sock = open_outbound(settings, "10.77.3.9", socket.SOCK_STREAM)
status = sandbox.status()
print(json.dumps({"uid": status["Uid"], "caps": status["CapEff"],
                  "device": sock.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16)
                  .rstrip(b"\0").decode()}))
"""


def test_outbound_if_still_binds_after_the_drop_to_nobody(tmp_path: Path) -> None:
    """Since Linux 5.7 SO_BINDTODEVICE needs no capability on a socket not yet bound to a
    device: vhostnet, dropped to nobody with no capability under its seccomp filter, still
    binds every new outbound socket (on an older kernel it logs why it cannot)."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to be dropped from")
    with veth_pair("vhnout3", "10.77.3.1/24"):
        result = subprocess.run([sys.executable, "-c", AS_NOBODY, "vhnout3"], cwd=REPO,
                                capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["uid"].split()[0] == "65534" and int(report["caps"], 16) == 0
    assert report["device"] == "vhnout3"


# --- the command line ----------------------------------------------------------------


def test_the_options_reach_the_configuration() -> None:
    with veth_pair("vhnout4", "10.77.4.1/24", "fd77:4::1/64"):
        config = parsed_config("-o", SECOND_LOOPBACK, "-o", "fd77:4::1", "--outbound-if4", "vhnout4",
                         "--outbound-if6", "vhnout4")
    assert (config.outbound_ipv4, config.outbound_ipv6) == (ip4(SECOND_LOOPBACK),
                                                            ip6("fd77:4::1"))
    assert (config.outbound_if4, config.outbound_if6) == ("vhnout4", "vhnout4")


def test_map_guest_addr_without_a_reaches_the_template_interfaces_address() -> None:
    """passt: --map-guest-addr leads to the address -a gave the guest, by default the host's
    address on the template interface (-i, else --outbound-if4/6, else the default route's)."""
    mapped = ["--map-guest-addr", "10.0.2.8", "--map-guest-addr", "fd00::8"]
    with veth_pair("vhnout5", "10.77.5.1/24", "fd77:5::1/64"):
        by_i = parsed_config("-i", "vhnout5", *mapped)
        by_outbound_if = parsed_config("--outbound-if4", "vhnout5", "--outbound-if6", "vhnout5",
                                 *mapped)
        by_a = parsed_config("-i", "vhnout5", "-a", "10.0.2.20", "-a", "fd00::20", *mapped)
    for config in (by_i, by_outbound_if):
        assert config.host_destination(ip4("10.0.2.8"), 80) == ("10.77.5.1", 80)
        assert config.host_destination6(ip6("fd00::8"), 80) == ("fd77:5::1", 80)
    assert by_a.host_destination(ip4("10.0.2.8"), 80) == ("10.0.2.20", 80)
    assert by_a.host_destination6(ip6("fd00::8"), 80) == ("fd00::20", 80)
    # No template here (the test namespace has no default route): the guest's own address.
    alone = parsed_config(*mapped)
    assert alone.host_destination(ip4("10.0.2.8"), 80) == ("10.0.2.15", 80)
    assert alone.host_destination6(ip6("fd00::8"), 80, GUEST_IP6) == (
        socket.inet_ntop(socket.AF_INET6, GUEST_IP6), 80)


@pytest.mark.parametrize(("argv", "sentence"), [
    (["-o", "192.0.2.1"], "-o/--outbound 192.0.2.1: this host has no such address"),
    (["-o", "::1"], "-o/--outbound ::1 cannot be a source address"),
    (["-o", "224.0.0.1"], "-o/--outbound 224.0.0.1 cannot be a source address"),
    (["-o", "::ffff:127.0.0.1"], "cannot be a source address"),
    (["-o", "127.0.0.1", "-o", "127.0.0.2"], "-o/--outbound is given twice for IPv4"),
    (["--outbound-if4", "nosuch0"], "--outbound-if4: there is no network interface 'nosuch0'"),
    (["--outbound-if6", "nosuch0"], "--outbound-if6: there is no network interface 'nosuch0'"),
    (["-i", "nosuch0"], "-i/--interface: there is no network interface 'nosuch0'"),
])
def test_bad_values_are_one_sentence_and_exit_2(argv: list[str], sentence: str,
                                                tmp_path: Path) -> None:
    result = run_cli(*argv, "-f", "--socket", str(tmp_path / "s"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and sentence in lines[0], result.stderr
    assert not (tmp_path / "s").exists()
