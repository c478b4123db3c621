"""Host "ping sockets" for the ICMP echo engine (``vhostnet.stack.icmp.IcmpEngine``).

Unprivileged ICMP echo uses ``socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)`` (and
``socket(AF_INET6, SOCK_DGRAM, IPPROTO_ICMPV6)`` for ICMPv6, chosen by the address): the
kernel fills in the echo identifier (the socket's "port") and the checksum,
and delivers only the replies to that identifier, without the IP header. The
engine maps them back to the guest's identifier. When
``net.ipv4.ping_group_range`` (which governs both families) excludes us, socket creation fails: the glue tells
the engine once (``on_host_echo_unavailable``) and only local echo answers remain.

``IcmpGlue(engine, loop)``: ``flush()`` executes ``IcmpOpen`` / ``IcmpEchoSend`` /
``IcmpClose``; replies are read in bounded batches; ``close()`` closes every socket.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Callable

from vhostnet.hostio.udp import receive_batch
from vhostnet.outbound import OutboundSettings, open_outbound
from vhostnet.stack.icmp import IcmpClose, IcmpEchoSend, IcmpEngine, IcmpOpen
from vhostnet.wire.icmp import TYPE_ECHO_REQUEST
from vhostnet.wire.icmpv6 import ECHO_REQUEST as ECHO_REQUEST6


def open_ping_socket(settings: OutboundSettings, host_addr: str) -> socket.socket:
    """A connected non-blocking ping socket (ICMPv6 for an IPv6 address), bound to
    -o/--outbound-if4/6 as passt binds its ping sockets; ``PermissionError`` when the host
    forbids them."""
    proto = socket.IPPROTO_ICMPV6 if ":" in host_addr else socket.IPPROTO_ICMP
    sock = open_outbound(settings, host_addr, socket.SOCK_DGRAM, proto)
    try:
        sock.connect((host_addr, 0))
    except OSError:
        sock.close()
        raise
    return sock


class IcmpGlue:
    def __init__(self, engine: IcmpEngine, loop: asyncio.AbstractEventLoop,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.loop = loop
        self.clock = clock
        self._sockets: dict[int, socket.socket] = {}

    def flush(self) -> None:
        commands = self.engine.commands
        while commands:
            command = commands.popleft()
            if isinstance(command, IcmpEchoSend):
                self._send(command)
            elif isinstance(command, IcmpOpen):
                self._open(command)
            elif isinstance(command, IcmpClose):
                self._close_flow(command.flow_id)

    def _open(self, command: IcmpOpen) -> None:
        try:
            sock = open_ping_socket(self.engine.config, command.host_addr)
        except PermissionError as error:
            commands_left = [c for c in self.engine.commands if not isinstance(c, IcmpEchoSend)]
            self.engine.commands.clear()
            self.engine.commands.extend(commands_left)
            self.engine.on_host_echo_unavailable(
                f"{error.strerror} (see sysctl net.ipv4.ping_group_range)")
            return
        except OSError as error:
            self.engine.counters.inc("icmp.host_error")
            self.engine.counters.log_once(f"icmp.open.{error.errno}",
                                          f"cannot open ping socket: {error.strerror}")
            return
        self._sockets[command.flow_id] = sock
        self.loop.add_reader(sock.fileno(), self._on_readable, command.flow_id, sock)

    def _send(self, command: IcmpEchoSend) -> None:
        sock = self._sockets.get(command.flow_id)
        if sock is None:
            self.engine.counters.inc("icmp.drop.no_socket")
            return
        # Identifier and checksum are left zero: the kernel fills both in.
        kind = ECHO_REQUEST6 if sock.family == socket.AF_INET6 else TYPE_ECHO_REQUEST
        request = struct.pack("!BBHHH", kind, 0, 0, 0, command.seq) + command.payload
        try:
            sock.send(request)
        except OSError:
            self.engine.counters.inc("icmp.drop.host_send")

    def _on_readable(self, flow_id: int, sock: socket.socket) -> None:
        replies, _error = receive_batch(sock)
        now = self.clock()
        for reply in replies:
            self.engine.on_echo_reply(flow_id, reply, now)

    def _close_flow(self, flow_id: int) -> None:
        sock = self._sockets.pop(flow_id, None)
        if sock is not None:
            self.loop.remove_reader(sock.fileno())
            sock.close()

    def close(self) -> None:
        for flow_id in list(self._sockets):
            self._close_flow(flow_id)
