"""IcmpGlue: echo to 127.0.0.1 through a ping socket, and the fallback when they are forbidden.

Ping sockets need ``net.ipv4.ping_group_range`` to include our group. When the
host forbids them and we are root, the echo test re-runs itself inside a new
network namespace (``unshare --net``, loopback only) where it may allow them.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import struct
import subprocess
import sys

import pytest

from tests.support.daemon import REPO
from tests.support.frames import (
    GATEWAY_IP,
    GATEWAY_MAC,
    GUEST_IP,
    arp_request,
    guest_ipv4_frame,
    icmp_echo,
    icmpv6,
    ipv6_frame,
    parse_ipv6_frame,
)
from tests.support.hostio import wait_for_frames
from vhostnet.hostio.icmp import IcmpGlue
from vhostnet.network import build_stack
from vhostnet.stack.config import StackConfig
from vhostnet.stack.stack import NetworkStack

IN_NAMESPACE = "VHOSTNET_TEST_IN_NETNS"


def ping_sockets_allowed() -> bool:
    try:
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP).close()
    except PermissionError:
        return False
    return True


def ping_through_glue(destination: bytes) -> tuple[NetworkStack, list[bytes]]:
    async def scenario() -> tuple[NetworkStack, list[bytes]]:
        loop = asyncio.get_running_loop()
        stack = build_stack(StackConfig())
        glue = IcmpGlue(stack.icmp, loop)
        try:
            stack.receive_frame(arp_request(GATEWAY_IP), loop.time())
            stack.frames_to_guest.clear()
            for seq in (1, 2):
                echo = icmp_echo(8, 0x4321, seq, b"data")
                stack.receive_frame(guest_ipv4_frame(destination, 1, echo), loop.time())
            glue.flush()
            return stack, await wait_for_frames(stack, 2, timeout=2.0)
        finally:
            glue.close()

    return asyncio.run(scenario())


def rerun_in_private_namespace(test: str, address: str) -> None:
    """Run ``test`` again in a fresh network namespace whose loopback also has ``address``
    and allows ping sockets; skip without root or unshare(1)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        print("skipping: needs root and unshare(1) to make a private network namespace")
        pytest.skip("needs root and unshare(1) for a private network namespace")
    script = (f"ip link set lo up && ip addr add {address} dev lo && "
              "sysctl -q -w net.ipv4.ping_group_range='0 2147483647' && "
              f"{sys.executable} -m pytest -q -p no:cacheprovider "
              f"tests/hostio/test_hostio_icmp.py::{test}")
    result = subprocess.run(["unshare", "--net", "sh", "-c", script], capture_output=True,
                            text=True, timeout=60, env={**os.environ, IN_NAMESPACE: "1"},
                            cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout, result.stdout


def test_echo_via_ping_socket_in_private_namespace() -> None:
    """Always runs in a fresh network namespace, so the echo never leaves this machine.

    The guest's target must not be 127/8 (``host_destination`` keeps loopback for the
    gateway mapping), so the namespace's loopback gets 10.9.9.9 and the guest pings that.
    """
    if not os.environ.get(IN_NAMESPACE):
        rerun_in_private_namespace("test_echo_via_ping_socket_in_private_namespace",
                                   "10.9.9.9/32")
        return
    if not ping_sockets_allowed():
        print("skipping: ping sockets still forbidden inside the namespace")
        pytest.skip("ping sockets forbidden even inside the private namespace")
    stack, frames = ping_through_glue(bytes([10, 9, 9, 9]))
    assert len(frames) == 2
    for seq, frame in enumerate(frames, start=1):
        ip = frame[14:]
        assert ip[12:16] == bytes([10, 9, 9, 9]) and ip[16:20] == GUEST_IP
        assert ip[20:] == icmp_echo(0, 0x4321, seq, b"data")
    assert stack.counters()["icmp.echo.reply"] == 2


def test_forbidden_ping_sockets_leave_only_local_echo() -> None:
    if ping_sockets_allowed():
        pytest.skip("ping sockets are allowed here; the fallback path cannot be provoked")

    async def scenario() -> NetworkStack:
        loop = asyncio.get_running_loop()
        stack = build_stack(StackConfig())
        glue = IcmpGlue(stack.icmp, loop)
        try:
            stack.receive_frame(arp_request(GATEWAY_IP), loop.time())
            stack.frames_to_guest.clear()
            stack.receive_frame(guest_ipv4_frame(bytes([192, 0, 2, 1]), 1, icmp_echo(8, 1, 1, b"")),
                                loop.time())
            glue.flush()
            assert not stack.icmp.host_echo_available
            stack.receive_frame(guest_ipv4_frame(bytes([192, 0, 2, 1]), 1, icmp_echo(8, 1, 2, b"")),
                                loop.time())
            stack.receive_frame(guest_ipv4_frame(GATEWAY_IP, 1, icmp_echo(8, 1, 3, b"")), loop.time())
            return stack
        finally:
            glue.close()

    stack = asyncio.run(scenario())
    assert len(stack.frames_to_guest) == 1  # only the gateway answered
    assert stack.counters()["icmp.drop.no_ping_socket"] == 1
    assert stack.icmp.commands == type(stack.icmp.commands)()


GUEST6 = bytes.fromhex("fec0000000000000505400fffe123456")
TARGET6 = bytes.fromhex("20010db8009900000000000000000009")  # 2001:db8:99::9


def test_icmpv6_echo_via_ping_socket_in_private_namespace() -> None:
    """ICMPv6 echo through an IPPROTO_ICMPV6 ping socket (same rules as the IPv4 test: the
    target, 2001:db8:99::9, lives on the namespace's loopback)."""
    if not os.environ.get(IN_NAMESPACE):
        rerun_in_private_namespace("test_icmpv6_echo_via_ping_socket_in_private_namespace",
                                   "2001:db8:99::9/128 nodad")
        return
    if not ping_sockets_allowed():
        pytest.skip("ping sockets forbidden even inside the private namespace")

    async def scenario() -> tuple[NetworkStack, list[bytes]]:
        loop = asyncio.get_running_loop()
        stack = build_stack(StackConfig())
        glue = IcmpGlue(stack.icmp, loop)
        try:
            for seq in (1, 2):
                echo = icmpv6(GUEST6, TARGET6, icmp_echo(128, 0x4321, seq, b"data"))
                stack.receive_frame(ipv6_frame(GUEST6, TARGET6, echo, hop_limit=64,
                                               dst_mac=GATEWAY_MAC), loop.time())
            glue.flush()
            return stack, await wait_for_frames(stack, 2, timeout=2.0)
        finally:
            glue.close()

    stack, frames = asyncio.run(scenario())
    assert len(frames) == 2
    for seq, frame in enumerate(frames, start=1):
        src, dst, next_header, _, message = parse_ipv6_frame(frame)
        assert (src, dst, next_header) == (TARGET6, GUEST6, 58)
        assert message[0] == 129 and message[4:] == struct.pack("!HH", 0x4321, seq) + b"data"
    assert stack.counters()["icmp6.echo.reply"] == 2
