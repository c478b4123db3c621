"""UdpGlue over IPv6 against real sockets on ::1 and 127.0.0.1: the mapped gateway reaches
the host's ::1, a refused port comes back as ICMPv6, and a forward without a bind address
serves IPv4 and IPv6 peers on one dual-stack socket."""

from __future__ import annotations

import asyncio
import socket

from tests.hostio.test_hostio_udp import echo_server
from tests.support.frames import (
    GATEWAY_IP,
    GUEST_IP,
    GUEST_IP6,
    arp_request,
    guest_udp6_frame,
    parse_ipv6_frame,
    parse_udp6_frame,
    parse_udp_frame,
)
from tests.support.hostio import wait_for_frames
from vhostnet.hostio.udp import UdpGlue
from vhostnet.network import build_stack
from vhostnet.stack.config import StackConfig, ip6, parse_port_spec

GATEWAY6 = ip6("fec0::2")


def free_udp6_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        sock.bind(("::1", 0))
        return sock.getsockname()[1]


def test_guest_to_host_echo_on_ipv6_loopback_through_the_gateway() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        server = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        server.bind(("::1", 0))
        server.setblocking(False)
        port = server.getsockname()[1]
        stack = build_stack(StackConfig())
        glue = UdpGlue(stack.udp_nat, loop)
        try:
            serving = asyncio.ensure_future(echo_server(server, 1))
            stack.receive_frame(guest_udp6_frame(4000, GATEWAY6, port, b"hello"), loop.time())
            glue.flush()
            (frame,) = await wait_for_frames(stack, 1)
            await serving
            assert parse_udp6_frame(frame) == (GATEWAY6, port, GUEST_IP6, 4000, b"echo:hello")
        finally:
            glue.close()
            server.close()

    asyncio.run(scenario())


def test_closed_ipv6_port_gives_icmpv6_port_unreachable() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        port = free_udp6_port()
        stack = build_stack(StackConfig())
        glue = UdpGlue(stack.udp_nat, loop)
        try:
            stack.receive_frame(guest_udp6_frame(4000, GATEWAY6, port, b"anyone?"), loop.time())
            glue.flush()
            (frame,) = await wait_for_frames(stack, 1)
            src, dst, next_header, _hops, message = parse_ipv6_frame(frame)
            assert (src, dst, next_header, message[:2]) == (GATEWAY6, GUEST_IP6, 58, b"\x01\x04")
        finally:
            glue.close()

    asyncio.run(scenario())


def test_forward_without_address_serves_dual_stack_on_one_socket() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        host_port = free_udp6_port()
        (forward,) = parse_port_spec(f"{host_port}:5000")
        stack = build_stack(StackConfig(udp_forwards=[forward]))
        glue = UdpGlue(stack.udp_nat, loop)
        client4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            assert glue.open_sockets == 1
            for client, address in ((client4, "127.0.0.1"), (client6, "::1")):
                client.bind((address, 0))
                client.setblocking(False)
            stack.receive_frame(arp_request(GATEWAY_IP), loop.time())  # learns the IPv4 guest
            stack.receive_frame(guest_udp6_frame(5000, ip6("fec0::99"), 1, b""), loop.time())
            stack.frames_to_guest.clear()
            client4.sendto(b"four", ("127.0.0.1", host_port))
            (frame,) = await wait_for_frames(stack, 1)
            assert parse_udp_frame(frame) == (
                GATEWAY_IP, client4.getsockname()[1], GUEST_IP, 5000, b"four")
            stack.frames_to_guest.clear()
            client6.sendto(b"six", ("::1", host_port))
            (frame,) = await wait_for_frames(stack, 1)
            assert parse_udp6_frame(frame) == (
                GATEWAY6, client6.getsockname()[1], GUEST_IP6, 5000, b"six")
            stack.receive_frame(guest_udp6_frame(5000, GATEWAY6, client6.getsockname()[1],
                                                 b"back"), loop.time())
            glue.flush()
            data, _peer = await asyncio.wait_for(loop.sock_recvfrom(client6, 100), 3.0)
            assert data == b"back"
        finally:
            glue.close()
            client4.close()
            client6.close()

    asyncio.run(scenario())


def test_ipv6_only_spec_does_not_take_ipv4() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        host_port = free_udp6_port()
        (forward,) = parse_port_spec(f"[::1]/{host_port}")
        stack = build_stack(StackConfig(udp_forwards=[forward]))
        glue = UdpGlue(stack.udp_nat, loop)
        try:
            # 127.0.0.1 of the same port is still free: the listener is on ::1 only.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
                other.bind(("127.0.0.1", host_port))
            assert glue.open_sockets == 1
        finally:
            glue.close()

    asyncio.run(scenario())
