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


async def tcp_echo_until_eof(reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
    """An ``asyncio.start_server`` handler that sends back whatever comes, until EOF."""
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    finally:
        writer.close()


def port_is_free(port: int, kind: int = socket.SOCK_STREAM) -> bool:
    """Whether a dual-stack socket can bind ``port`` (and listen, for TCP) as a server would:
    SO_REUSEADDR, so that connections still using the port as theirs do not count."""
    with socket.socket(socket.AF_INET6, kind) as sock:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("::", port))
            if kind == socket.SOCK_STREAM:
                sock.listen()
        except OSError:
            return False
        return True
