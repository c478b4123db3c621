"""UdpGlue against real sockets on 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import socket

from tests.support.frames import GATEWAY_IP, GUEST_IP, arp_request, guest_udp_frame, parse_udp_frame
from tests.support.hostio import echo_server, free_udp_port, wait_for_frames
from tests.support.stack import poll_timers
from vhostnet.hostio.udp import UdpGlue, receive_batch
from vhostnet.network import build_stack
from vhostnet.stack.config import PortForward, StackConfig


def test_guest_to_host_echo_through_gateway() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        server.bind(("127.0.0.1", 0))
        server.setblocking(False)
        port = server.getsockname()[1]
        stack = build_stack(StackConfig())
        glue = UdpGlue(stack.udp_nat, loop)
        try:
            serving = asyncio.ensure_future(echo_server(server, 2))
            stack.receive_frame(guest_udp_frame(4000, GATEWAY_IP, port, b"hello"), loop.time())
            stack.receive_frame(guest_udp_frame(4000, GATEWAY_IP, port, b"again"), loop.time())
            glue.flush()
            frames = await wait_for_frames(stack, 2)
            await serving
            assert [parse_udp_frame(f) for f in frames] == [
                (GATEWAY_IP, port, GUEST_IP, 4000, b"echo:hello"),
                (GATEWAY_IP, port, GUEST_IP, 4000, b"echo:again"),
            ]
            assert glue.open_sockets == 1
            poll_timers(stack, loop.time() + 1000)
            glue.flush()
            assert glue.open_sockets == 0
        finally:
            glue.close()
            server.close()

    asyncio.run(scenario())


def test_closed_port_gives_icmp_port_unreachable() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        port = free_udp_port()
        stack = build_stack(StackConfig())
        glue = UdpGlue(stack.udp_nat, loop)
        try:
            stack.receive_frame(guest_udp_frame(4000, GATEWAY_IP, port, b"anyone?"), loop.time())
            glue.flush()
            (frame,) = await wait_for_frames(stack, 1)
            assert frame[14 + 9] == 1  # ICMP
            assert frame[14 + 20 : 14 + 22] == b"\x03\x03"
            assert stack.counters()["udp.port_unreachable"] == 1
        finally:
            glue.close()

    asyncio.run(scenario())


def test_inbound_forward_round_trip() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        host_port = free_udp_port()
        forward = PortForward("127.0.0.1", host_port, 5000)
        stack = build_stack(StackConfig(udp_forwards=[forward]))
        glue = UdpGlue(stack.udp_nat, loop)
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.bind(("127.0.0.1", 0))
        client.setblocking(False)
        client_port = client.getsockname()[1]
        try:
            stack.receive_frame(arp_request(GATEWAY_IP), loop.time())  # the stack learns the guest
            stack.frames_to_guest.clear()
            client.sendto(b"knock", ("127.0.0.1", host_port))
            (frame,) = await wait_for_frames(stack, 1)
            assert parse_udp_frame(frame) == (GATEWAY_IP, client_port, GUEST_IP, 5000, b"knock")
            stack.receive_frame(guest_udp_frame(5000, GATEWAY_IP, client_port, b"who"), loop.time())
            glue.flush()
            data, peer = await asyncio.wait_for(loop.sock_recvfrom(client, 100), 3.0)
            assert (data, peer) == (b"who", ("127.0.0.1", host_port))
        finally:
            glue.close()
            client.close()

    asyncio.run(scenario())


def test_receive_batch_is_bounded_and_stops_at_eagain() -> None:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        receiver.bind(("127.0.0.1", 0))
        receiver.setblocking(False)
        for i in range(5):
            sender.sendto(bytes([i]), receiver.getsockname())
        first, error = receive_batch(receiver, limit=3)
        assert (first, error) == ([b"\0", b"\1", b"\2"], None)
        rest, error = receive_batch(receiver, limit=10)
        assert (rest, error) == ([b"\3", b"\4"], None)
    finally:
        receiver.close()
        sender.close()
