"""DnsGlue against a tiny DNS server on 127.0.0.1 started by the test."""

from __future__ import annotations

import asyncio
import socket
import struct

from tests.support.dns import QUESTION, answer_to, query
from tests.support.frames import (
    DNS_IP,
    GATEWAY_IP,
    GUEST_IP,
    arp_request,
    guest_udp_frame,
    parse_udp_frame,
)
from tests.support.hostio import free_udp_port, wait_for_frames
from vhostnet.hostio.dns import DnsGlue
from vhostnet.network import build_stack
from vhostnet.stack.config import StackConfig


async def serve_one_answer(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    data, peer = await asyncio.wait_for(loop.sock_recvfrom(sock, 512), 3.0)
    await loop.sock_sendto(sock, answer_to(data), peer)


def test_query_answered_by_local_server_after_dead_first_upstream() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        server.bind(("127.0.0.1", 0))
        server.setblocking(False)
        dead = ("127.0.0.1", free_udp_port())  # nobody listens: the kernel refuses
        stack = build_stack(StackConfig(dns_upstream=[dead, server.getsockname()]))
        glue = DnsGlue(stack.dns, loop)
        try:
            serving = asyncio.ensure_future(serve_one_answer(server))
            stack.receive_frame(arp_request(GATEWAY_IP), loop.time())
            stack.frames_to_guest.clear()
            stack.receive_frame(guest_udp_frame(40000, DNS_IP, 53, query(0x4242)), loop.time())
            glue.flush()
            (frame,) = await wait_for_frames(stack, 1)
            await serving
            src, sport, dst, dport, payload = parse_udp_frame(frame)
            assert (src, sport, dst, dport) == (DNS_IP, 53, GUEST_IP, 40000)
            assert payload[:2] == b"\x42\x42"
            assert struct.unpack("!H", payload[2:4])[0] & 0x000F == 0  # NOERROR
            assert payload[12 : 12 + len(QUESTION)] == QUESTION
            assert payload.endswith(bytes([192, 0, 2, 80]))
            assert stack.counters()["dns.upstream_error"] >= 1
        finally:
            glue.close()
            server.close()

    asyncio.run(scenario())
