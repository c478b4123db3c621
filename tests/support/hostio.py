"""Helpers for tests of the host-socket glue."""

from __future__ import annotations

import asyncio
import socket

from vhostnet.stack.stack import NetworkStack


async def wait_for_frames(stack: NetworkStack, count: int, timeout: float = 3.0) -> list[bytes]:
    """Let the loop run until ``count`` frames are queued for the guest (bounded in time)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while len(stack.frames_to_guest) < count and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    frames = list(stack.frames_to_guest)
    stack.frames_to_guest.clear()
    return frames


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def echo_server(sock: socket.socket, count: int) -> None:
    loop = asyncio.get_running_loop()
    for _ in range(count):
        data, peer = await asyncio.wait_for(loop.sock_recvfrom(sock, 65535), 3.0)
        await loop.sock_sendto(sock, b"echo:" + data, peer)
